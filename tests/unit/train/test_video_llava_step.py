"""Video-LLaVA's stage-2 train step (projector and the whole LLM): on 8 simulated devices, FSDP × tensor, it
follows one device for 3 steps (parameters within 2e-5 relative, the same losses), and only the trainable
subtrees change. With LoRA, only the adapters and the projector train, and the merged export (through the
converter's files) gives the logits the adapters gave in training."""
import jax
import numpy as np
import pytest

from vllama_jax.config import load_config, model_config
from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.sharding import make_mesh
from vllama_jax.train.sharded import build_sharded_step

STEPS = 3


def batches(config, model_cfg, count: int):
    """Random batches: rows 0-3 hold an image block, rows 4-7 a video block, labels on the text after them."""
    rng = np.random.default_rng(0)
    rows, length = config.batch_size, config.data.text_length
    image_rows, video_rows = int(rows * config.data.image_share), int(rows * config.data.video_share)
    out = []
    for _ in range(count):
        ids = rng.integers(3, 500, (rows, length)).astype(np.int32)
        ids[:image_rows, 1:1 + model_cfg.image_tokens] = model_cfg.image_token_id
        ids[image_rows:, 1:1 + model_cfg.video_tokens] = model_cfg.video_token_id
        size, frames = model_cfg.image_tower.image_size, model_cfg.video_tower.num_frames
        out.append({
            "images": rng.standard_normal((image_rows, size, size, 3)).astype(np.float32),
            "videos": rng.standard_normal((video_rows, frames, size, size, 3)).astype(np.float32),
            "input_ids": ids,
            "padding_mask": np.ones_like(ids, bool),
            "labels": np.where(np.arange(length) > 1 + model_cfg.video_tokens, ids, IGNORE_INDEX).astype(np.int32),
        })
    return out


def random_params(abstract: dict) -> dict:
    """Host arrays of the model's shapes (norm scales around 1): drawn with numpy, so no init program compiles."""
    rng = np.random.default_rng(1)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(leaf.dtype)
        return 1 + 0.1 * noise if jax.tree_util.keystr(path).endswith("['scale']") else 0.05 * noise

    return jax.tree_util.tree_map_with_path(draw, abstract)


def train(config, model_cfg, mesh, data):
    step = build_sharded_step(config, model_cfg, config.data.text_length, mesh=mesh)
    trainable, frozen = step.model.split(random_params(step.model.abstract()))
    if "lora" in trainable:  # B at zero, as LoRA starts: the first step moves the model only through B
        trainable["lora"] = jax.tree_util.tree_map_with_path(
            lambda path, x: x * 0 if jax.tree_util.keystr(path).endswith("['b']") else x, trainable["lora"])
    with step.model.on_mesh():
        state = step.state_from_trainable(jax.device_put(trainable, step.model.split(step.model.shardings)[0]))
        frozen = jax.device_put(frozen, {k: step.model.shardings[k] for k in frozen})
        start = trainable
        losses = []
        for batch in data:
            placed = {k: jax.device_put(v, step.batch[k].sharding) for k, v in batch.items()}
            state, metrics = step.step_fn(state, frozen, placed)
            losses.append(float(metrics["loss"]))
    return step, start, jax.device_get(state.trainable), losses, frozen


@pytest.fixture(scope="module")
def runs(repo_root):
    config = load_config(str(repo_root / "configs/video_llava.py:llm=tiny,recipe=stage2"))
    for part in ("image_tower", "video_tower", "llm"):  # scanned, as at full size (and one compile of each block)
        config.model[part].scan_layers = True
    model_cfg = model_config(config)
    data = batches(config, model_cfg, STEPS)
    one = train(config, model_cfg, make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]), data)
    eight = train(config, model_cfg, make_mesh({"data": 1, "fsdp": 4, "tensor": 2}), data)
    lora_config = config.copy_and_resolve_references()
    lora_config.lora = {"rank": 4, "alpha": 8.0}
    with_lora = train(lora_config, model_cfg, make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]), data)
    return config, one, eight, (lora_config, data, with_lora)


def test_stage2_trains_the_projector_and_the_whole_llm(runs):
    config, (step, start, end, losses, _), *_ = runs
    assert step.model.trainable_names == ("mm_projector", "language_model")
    assert set(step.frozen_names) == {"image_tower", "video_tower"}
    for name in ("mm_projector", "language_model"):
        changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), start[name], end[name])
        assert all(jax.tree_util.tree_leaves(changed)), name
    assert all(np.isfinite(losses))


def test_eight_devices_follow_one(runs):
    _, (_, _, one_end, one_losses, _), (step, _, eight_end, eight_losses, _), _ = runs
    kernel = step.model.abstract(["language_model"])["language_model"]["decoder"]["layers"]["gate_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # (layers, embed, mlp)
    np.testing.assert_allclose(eight_losses, one_losses, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), eight_end, one_end)


def test_lora_trains_adapters_and_projector_and_exports_merged(runs, tmp_path):
    from vllama_jax.config import lora_config as lora_of
    from vllama_jax.convert import video_llava as convert
    from vllama_jax.models import lora
    from vllama_jax.models.video_llava import VideoLlava

    *_, (config, data, (step, start, end, losses, frozen)) = runs
    assert step.model.trainable_names == ("mm_projector", "lora") and "language_model" in step.frozen_names
    assert np.abs(end["lora"]["language_model"]["decoder"]["layers"]["self_attn"]["q_proj"]["b"]).max() > 0
    assert not np.array_equal(end["mm_projector"]["linear_1"]["kernel"], start["mm_projector"]["linear_1"]["kernel"])
    assert all(np.isfinite(losses))
    model_cfg = model_config(config)
    adapters = lora_of(config)
    merged = lora.merge({**jax.device_get(frozen), **end}, adapters)
    batch = data[0]
    apply = jax.jit(lambda params: VideoLlava(model_cfg).apply(
        {"params": params}, batch["input_ids"], images=batch["images"], videos=batch["videos"]))
    trained = apply(merged)
    state, _ = convert.export_params(merged, model_cfg)
    convert.save_state_dict(state, tmp_path / "merged")
    back, _ = convert.import_params(convert.read_state_dict(tmp_path / "merged"), model_cfg,
                                    convert.abstract_params(model_cfg))
    exported = apply(back)
    np.testing.assert_array_equal(np.asarray(exported), np.asarray(trained))
