"""Video-LLaVA (PKU-YuanGroup), the original's two stages: which LLM, which stage, the precision, the mesh.

    vllama-plan --config configs/video_llava.py:llm=vicuna_7b,recipe=stage2 --devices 64 --mesh fsdp=64
    (any field: --config.x=y)

Arguments (`name=value`, comma-separated):
- llm: vicuna_7b (Vicuna-7B v1.5, the default) or `tiny` (the whole small model every CPU test uses).
- recipe: stage1 (default; projector only) or stage2 (projector and the whole LLM), as the original's
  scripts/v1_5/pretrain.sh and finetune.sh: transformers' cosine schedule with 3 % warm-up, no weight decay, one
  epoch.

Tower and LLM sizes are the model dataclasses' defaults (models/clip_vit.py, models/video_llava.py), so each size
is written once, in the model files.
"""

import dataclasses
import math

import ml_collections

from vllama_jax.config import parse_arg
from vllama_jax.models.llama import SIZES
from vllama_jax.models.video_llava import TRAINABLE, VideoLlavaConfig
from vllama_jax.sharding import DEFAULT_RULES
from vllama_jax.train.optimizer import OptimizerConfig

# Same structure as the full model, small enough for CPU tests: 28-px frames (4 patches), 3-layer towers of which
# the model reads the second's output (select_layer -2), 4 frames per video, the tiny GQA LLaMA with the two
# placeholder ids inside its vocabulary (transformers looks them up).
TINY_TOWER = dict(image_size=28, width=32, num_layers=3, num_heads=4, mlp_dim=64)
TINY = dict(
    image_tower=TINY_TOWER,
    video_tower=dict(TINY_TOWER, num_frames=4),
    llm=dataclasses.asdict(SIZES["tiny"]),
    image_token_id=510,
    video_token_id=511,
)
SMALL_MODELS = {"tiny": TINY}
FULL_SIZE_LLMS = ("vicuna_7b",)

# The original scripts (scripts/v1_5/pretrain.sh, finetune.sh; ../shared/VIDEO_LLAVA.md §2c). `samples`: one epoch
# of the stage's data (stage 1: LCS-558K images + Valley ~703K videos; stage 2: ~765K image, video and text-only
# conversations), so steps = ceil(samples / batch).
RECIPES = {
    "stage1": dict(batch=256, lr=1e-3, samples=558_128 + 703_000),  # Valley: "~703K", so approximate
    "stage2": dict(batch=128, lr=2e-5, samples=765_000),  # "~765K", approximate
}
WARMUP_RATIO = 0.03


def model(llm: str) -> dict:
    """The model config dict: full-size towers and LLM (the frozen towers in bfloat16, everything scanned), or a
    whole small model."""
    full = dataclasses.asdict(VideoLlavaConfig())
    if llm in SMALL_MODELS:
        for key, value in SMALL_MODELS[llm].items():
            full[key] = {**full[key], **value} if isinstance(value, dict) else value
        return full
    if llm not in FULL_SIZE_LLMS:
        raise ValueError(f"unknown llm {llm!r}: expected one of {FULL_SIZE_LLMS} or {sorted(SMALL_MODELS)}")
    for tower in ("image_tower", "video_tower"):
        full[tower].update(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)
    # the LLM trains in stage 2: bfloat16 compute over float32 weights (the original's bf16 mixed precision)
    full["llm"].update(dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="dots_no_batch")
    return full


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, llm="vicuna_7b", recipe="stage1")
    if args.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {args.recipe!r}: expected one of {sorted(RECIPES)}")
    row = RECIPES[args.recipe]
    config = ml_collections.ConfigDict()
    config.name = f"video_llava:llm={args.llm},recipe={args.recipe}"
    config.family = "video_llava"
    config.recipe = args.recipe
    config.seed = 42
    config.model = model(args.llm)
    tiny = args.llm in SMALL_MODELS
    config.batch_size = 8 if tiny else row["batch"]
    steps = 3 if tiny else math.ceil(row["samples"] / row["batch"])
    config.data = dict(
        # a batch holds share × rows images and videos at static shapes (the k-th image of the batch fills the
        # k-th <image> block, in row order); rows without a placeholder are text-only
        image_share=0.5,
        video_share=0.5,
        # tokens per row after expanding <image> / <video> (the original truncates the spliced sequence at
        # tokenizer_model_max_length 3072)
        text_length=40 if tiny else 3072,
        tokenizer="",  # the LLM's tokenizer directory (Vicuna's), read by vllama-chat
    )
    config.optimizer = dataclasses.asdict(OptimizerConfig())
    config.optimizer.update(
        schedule="warmup_cosine", init_lr=row["lr"], min_lr=0.0, warmup_lr=0.0, weight_decay=0.0,
        warmup_steps=math.ceil(WARMUP_RATIO * steps), iters_per_epoch=steps, max_epoch=1,
    )
    config.train = dict(steps=steps, trainable=TRAINABLE[args.recipe])
    config.mesh = dict(data=-1, fsdp=1, tensor=1) if tiny else dict(data=1, fsdp=-1, tensor=1)
    config.logical_axis_rules = [list(rule) for rule in DEFAULT_RULES]
    return config
