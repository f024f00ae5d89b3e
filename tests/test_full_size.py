"""Full-size parameter counts by `jax.eval_shape` (nothing allocated), against SPEC.md's numbers."""
import jax
import jax.numpy as jnp
import pytest

from vllama_jax.config import load_config, model_config
from vllama_jax.models.llama import LlamaForCausalLM
from vllama_jax.models.qformer import QFormer, QFormerConfig
from vllama_jax.models.video_llama import VISUAL_TRAINABLE, VideoLlama, count_params


def abstract_video_llama(repo_root, name):
    cfg = model_config(load_config(f"{repo_root}/configs/video_llama.py:{name}"))
    model = VideoLlama(cfg)
    frames = jax.ShapeDtypeStruct((1, 8, 224, 224, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 64), jnp.int32)
    params = jax.eval_shape(lambda f, i: model.init(jax.random.key(0), f, i)["params"], frames, ids)
    return cfg, model, params, frames, ids


@pytest.fixture(scope="module")
def llama2_7b(repo_root):
    return abstract_video_llama(repo_root, "llama2_7b_chat")


def test_vision_tower_counts(llama2_7b):
    _, _, params, _, _ = llama2_7b
    assert count_params(params, ("visual_encoder", "ln_vision")) == 985_897_344
    assert count_params(params, ("Qformer",)) == 105_137_664
    assert count_params(params, ("query_tokens",)) == 24_576
    assert count_params(params, ("video_Qformer",)) == 18_905_088


def test_trainable_visual_branch_on_llama2_7b(llama2_7b):
    _, _, params, _, _ = llama2_7b
    assert count_params(params, VISUAL_TRAINABLE) == 22_104_064
    assert count_params(params, ("llama_proj",)) == 3_149_824
    assert count_params(params, ("video_frame_position_embedding",)) == 24_576


def test_full_forward_shapes(llama2_7b):
    cfg, model, params, frames, ids = llama2_7b
    logits, soft = jax.eval_shape(lambda p, f, i: model.apply({"params": p}, f, i), params, frames, ids)
    assert soft["video"].shape == (1, 32, 4096)
    assert logits.shape == (1, 64, 32000) and logits.dtype == jnp.float32
    # frozen towers are stored in bfloat16, the trainable glue in float32
    assert jax.tree_util.tree_leaves(params["llama_model"])[0].dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params["video_Qformer"]))


@pytest.mark.parametrize(
    "name,expected", [("llama2_7b_chat", 6_738_415_616), ("vicuna_7b", 6_738_415_616), ("llama2_13b_chat", 13_015_864_320), ("vicuna_13b", 13_015_864_320)]
)
def test_llm_counts(repo_root, name, expected):
    cfg = model_config(load_config(f"{repo_root}/configs/video_llama.py:{name}")).llm
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = jax.eval_shape(lambda i: LlamaForCausalLM(cfg).init(jax.random.key(0), i)["params"], ids)
    assert count_params(params) == expected


def test_audio_width_qformer_count():
    cfg = QFormerConfig(num_layers=2, encoder_width=1024, cross_attention_freq=1)
    q = jax.ShapeDtypeStruct((1, 8, 768), jnp.float32)
    enc = jax.ShapeDtypeStruct((1, 8, 1024), jnp.float32)
    params = jax.eval_shape(lambda a, b: QFormer(cfg).init(jax.random.key(0), a, b)["params"], q, enc)
    assert count_params(params) == 19_691_520


def test_full_size_forward_compiles_sharded_over_8_devices(llama2_7b):
    """AOT: lower and compile the LLaMA-2-7B forward + loss on abstract inputs over an 8-way FSDP mesh."""
    import flax.linen as nn

    from vllama_jax import sharding
    from vllama_jax.models.video_llama import causal_lm_loss

    cfg, model, boxed, frames, ids = llama2_7b
    frames = jax.ShapeDtypeStruct((8, *frames.shape[1:]), frames.dtype)
    ids = jax.ShapeDtypeStruct((8, ids.shape[1]), ids.dtype)
    mesh = sharding.make_mesh((1, 8, 1))
    param_shardings = sharding.mesh_shardings(boxed, mesh)
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), param_shardings
    )
    inputs = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh, x.ndim)) for x in (frames, ids)]

    def forward(params, frames, ids):
        logits, _ = model.apply({"params": params}, frames, ids)
        return causal_lm_loss(logits, ids)[0]

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        compiled = jax.jit(forward).lower(abstract, *inputs).compile()
    total_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract))
    per_device = compiled.memory_analysis().argument_size_in_bytes
    # every large weight is split 8 ways; only small vectors (norms, biases) are replicated
    assert total_bytes / 8 <= per_device < 1.02 * total_bytes / 8
