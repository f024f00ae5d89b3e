"""LoRA as a parameter transform (`models/lora.py`): merging equals running the adapter beside the frozen kernel."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vllama_jax.models import lora


def boxed(array, names):
    return nn.LogicallyPartitioned(jnp.asarray(array), names)


def test_merged_kernels_compute_x_w_plus_scaled_x_a_b():
    rng = np.random.default_rng(0)
    cfg = lora.LoraConfig(rank=3, alpha=6.0, targets=("q_proj", "o_proj"), subtree="llm")
    # a scanned stack of 2 layers: q_proj (layers, embed, heads, kv), o_proj (layers, heads, kv, embed)
    q = rng.standard_normal((2, 8, 2, 4)).astype(np.float32)
    o = rng.standard_normal((2, 2, 4, 8)).astype(np.float32)
    params = {"llm": {"layers": {"q_proj": {"kernel": boxed(q, ("layers", "embed", "heads", "kv"))},
                                 "o_proj": {"kernel": boxed(o, ("layers", "heads", "kv", "embed"))},
                                 "up_proj": {"kernel": boxed(q, ("layers", "embed", "heads", "kv"))}}},
              "projector": {"kernel": boxed(q, (None,) * 4)}}
    adapters = lora.init(params, cfg, jax.random.key(0))["lora"]["llm"]["layers"]
    assert set(adapters) == {"q_proj", "o_proj"}  # only the targets
    assert adapters["o_proj"]["a"].value.shape == (2, 2, 4, 3) and adapters["o_proj"]["b"].names == (
        "layers", None, "embed")
    assert not np.asarray(adapters["q_proj"]["b"].value).any()  # B starts at zero: the model is unchanged
    plain = nn.unbox(params)
    trained = {"lora": {"llm": {"layers": {
        name: {"a": rng.standard_normal(v["a"].value.shape).astype(np.float32),
               "b": rng.standard_normal(v["b"].value.shape).astype(np.float32)} for name, v in adapters.items()}}}}
    merged = lora.merge({**plain, **trained}, cfg)
    assert "lora" not in merged and merged["projector"] is plain["projector"]
    x = rng.standard_normal((5, 8)).astype(np.float32)
    t = trained["lora"]["llm"]["layers"]
    for layer in range(2):
        a, b = t["q_proj"]["a"][layer], t["q_proj"]["b"][layer].reshape(3, -1)
        want = x @ q[layer].reshape(8, -1) + cfg.scale * (x @ a) @ b
        got = x @ np.asarray(merged["llm"]["layers"]["q_proj"]["kernel"][layer]).reshape(8, -1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        h = rng.standard_normal((5, 2, 4)).astype(np.float32)
        want = h.reshape(5, 8) @ o[layer].reshape(8, 8) + cfg.scale * (
            np.einsum("nhk,hkr->nr", h, t["o_proj"]["a"][layer]) @ t["o_proj"]["b"][layer])
        got = h.reshape(5, 8) @ np.asarray(merged["llm"]["layers"]["o_proj"]["kernel"][layer]).reshape(8, 8)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged["llm"]["layers"]["up_proj"]["kernel"], q)
    with pytest.raises(ValueError, match="need the weights they adapt"):
        lora.merge(trained, cfg)


def test_either_family_trains_adapters_instead_of_its_llm(repo_root):
    """By shape: Video-LLaMA's stage glue plus adapters on `llama_model`, Video-LLaVA's projector plus adapters on
    `language_model`; the LLM itself is frozen."""
    from vllama_jax import sharded_model
    from vllama_jax.config import load_config, model_config

    for spec, llm, glue in (("video_llama.py:llm=tiny,recipe=vision_stage2", "llama_model", "llama_proj"),
                            ("video_llava.py:llm=tiny,recipe=stage2", "language_model", "mm_projector")):
        config = load_config(str(repo_root / "configs" / spec))
        config.lora = {"rank": 4, "alpha": 8.0}
        model = sharded_model.from_config(config, model_config(config))
        assert glue in model.trainable_names and "lora" in model.trainable_names and llm in model.frozen_names
        adapter = model.abstract(["lora"])["lora"][llm]["decoder"]["layers_0"]["up_proj"]
        assert adapter["a"].shape == (64, 4) and adapter["b"].shape == (4, 128)
