"""configs/video_llava.py: the original's two stages, full sizes checked by shape (nothing allocated)."""
import jax
import pytest

from vllama_jax.config import load_config, model_config
from vllama_jax.sharding import make_mesh
from vllama_jax.train.sharded import build_sharded_step

# Parameter counts derived by hand from the architecture (../shared/VIDEO_LLAVA.md), checked against the model:
WIDTH, MLP, LAYERS = 1024, 4096, 24
CLIP_LAYER = 4 * (WIDTH**2 + WIDTH) + 2 * 2 * WIDTH + (WIDTH * MLP + MLP) + (MLP * WIDTH + WIDTH)
CLIP_VIT_L14 = (WIDTH + 3 * 14 * 14 * WIDTH + 257 * WIDTH) + 2 * 2 * WIDTH + LAYERS * CLIP_LAYER  # + pre/post LN
TEMPORAL = LAYERS * (4 * (WIDTH**2 + WIDTH) + 2 * WIDTH + 8 * WIDTH)  # temporal_embedding (1, 8, 1024) per layer
PROJECTOR = (WIDTH * 4096 + 4096) + (4096 * 4096 + 4096)
VICUNA_7B = 6_738_415_616  # SPEC §5


def full(recipe: str, repo_root):
    return load_config(str(repo_root / f"configs/video_llava.py:llm=vicuna_7b,recipe={recipe}"))


def test_full_size_parameter_counts(repo_root):
    from vllama_jax.models.video_llama import count_params
    from vllama_jax.models.video_llava import VideoLlava, init_params

    cfg = model_config(full("stage1", repo_root))
    params = jax.eval_shape(lambda: init_params(VideoLlava(cfg), jax.random.key(0)))
    assert CLIP_VIT_L14 == 303_179_776 and TEMPORAL == 101_007_360  # ViT-L/14's known size; the note's ~101.0 M
    assert count_params(params, ("image_tower",)) == CLIP_VIT_L14
    assert count_params(params, ("video_tower",)) == CLIP_VIT_L14 + TEMPORAL
    assert count_params(params, ("mm_projector",)) == PROJECTOR == 20_979_712
    assert count_params(params, ("language_model",)) == VICUNA_7B
    assert count_params(params) == 7_466_762_240
    assert (cfg.image_tokens, cfg.video_tokens) == (256, 2056)
    assert cfg.llm.rms_norm_eps == 1e-5  # Vicuna v1.5 is LLaMA-2 based


def test_the_two_stages(repo_root):
    stage1, stage2 = full("stage1", repo_root), full("stage2", repo_root)
    assert tuple(stage1.train.trainable) == ("mm_projector",)
    assert tuple(stage2.train.trainable) == ("mm_projector", "language_model")
    assert (stage1.batch_size, stage1.optimizer.init_lr, stage2.batch_size, stage2.optimizer.init_lr) == (
        256, 1e-3, 128, 2e-5)
    for config in (stage1, stage2):
        opt = config.optimizer
        assert opt.schedule == "warmup_cosine" and opt.weight_decay == 0.0 and opt.max_epoch == 1
        assert opt.warmup_steps == -(-3 * config.train.steps // 100)  # ceil(3 % of the steps)
    with pytest.raises(ValueError, match="unknown recipe"):
        load_config(str(repo_root / "configs/video_llava.py:recipe=stage3"))


def test_stage2_shards_the_7b_fine_tune_over_fsdp_and_tensor(repo_root):
    """The stage-2 step's state at full size on 8 devices (fsdp 4 × tensor 2), from shapes alone: 6.76 B
    trainable parameters, AdamW's two moments beside them, every big matrix split over all 8 devices."""
    config = full("stage2", repo_root)
    step = build_sharded_step(config, model_config(config), 3072, mesh=make_mesh({"data": 1, "fsdp": 4, "tensor": 2}),
                              batch_size=4)
    sizes = step.sizes()
    assert sizes["trainable"] == VICUNA_7B + PROJECTOR
    assert sizes["frozen"] == 2 * CLIP_VIT_L14 + TEMPORAL
    assert sizes["optimizer_bytes"] >= 2 * 4 * sizes["trainable"]  # float32 mu and nu
    state = step.abstract_state_with_shardings()
    mu = state.opt_state.inner_state[0].mu if hasattr(state.opt_state, "inner_state") else state.opt_state[0].mu
    kernel = mu["language_model"]["decoder"]["layers"]["up_proj"]["kernel"]
    assert kernel.shape == (32, 4096, 11008)
    assert kernel.sharding.shard_shape(kernel.shape) == (32, 1024, 5504)


def test_the_warmup_cosine_schedule_is_transformers(repo_root):
    from vllama_jax.train.optimizer import OptimizerConfig, learning_rate_schedule

    opt = full("stage2", repo_root).optimizer
    schedule = learning_rate_schedule(OptimizerConfig(**opt.to_dict()))
    total, warmup = opt.iters_per_epoch, opt.warmup_steps
    assert float(schedule(0)) == 0.0 and float(schedule(warmup)) == pytest.approx(2e-5)
    assert float(schedule(warmup // 2)) == pytest.approx(2e-5 * (warmup // 2) / warmup)
    assert float(schedule(warmup + (total - warmup) // 2)) == pytest.approx(1e-5, rel=1e-3)
    assert float(schedule(total)) == pytest.approx(0.0, abs=1e-12)


def test_tools_without_the_family_refuse_it(repo_root):
    from vllama_jax.config import require_family

    with pytest.raises(ValueError, match="vllama-train does not take the video_llava family yet"):
        require_family(full("stage1", repo_root), "vllama-train")
