"""Video-LLaMA, the paper's recipes: which LLM, which stage, the precision, the mesh.

    vllama-train --config configs/video_llama.py:llm=llama2_7b_chat,recipe=vision_stage1 --workdir runs/stage1 \
        --config.data.shards=shards/webvid --config.data.tokenizer=llama-2-7b-chat-hf \
        --config.train.frozen_checkpoint=ckpt/frozen --config.mesh.fsdp=8
    vllama-train --config configs/video_llama.py:llm=vicuna_13b,recipe=audio_stage2 --workdir …
    (any field: --config.x=y)
    vllama-plan --config configs/video_llama.py:llm=llama2_13b_chat --devices 8 --mesh fsdp=8

Arguments (`name=value`, comma-separated; the old positional `llama2_7b_chat,vision_stage2` still works):
- llm: vicuna_7b, vicuna_13b, llama2_7b_chat (default), llama2_13b_chat; or a whole small model: `tiny` (every
  CPU test's size) or `bench` (the benchmark's compute-bound size, `python -m vllama_jax.bench`).
- recipe: vision_stage1 (default), vision_stage2, audio_stage1, audio_stage2 (SPEC §8).

Tower sizes (EVA ViT-g, BLIP-2 Q-Former, video / audio Q-Formers, ImageBind) are the model dataclasses'
defaults and the LLM sizes `models.llama.SIZES`, so each size is written once, in the model files; this file
picks the LLM, the recipe and the precision. The CPU demo is its own experiment: configs/tiny_shapes.py.
"""

import dataclasses
from typing import TYPE_CHECKING

from vllama_jax.config import parse_arg
from vllama_jax.data.conversation import caption_prompt_template
from vllama_jax.models.llama import SIZES
from vllama_jax.models.video_llama import VideoLlamaConfig
from vllama_jax.sharding import DEFAULT_RULES
from vllama_jax.train.optimizer import OptimizerConfig

if TYPE_CHECKING:
    import ml_collections

FULL_SIZE_LLMS = ("vicuna_7b", "vicuna_13b", "llama2_7b_chat", "llama2_13b_chat")

# Same structure as the full model, small enough for CPU tests: 28-px frames (4 patches), 2-layer towers,
# a Q-Former with cross-attention every other layer (as BLIP-2), the tiny GQA LLaMA.
TINY = dict(
    vision=dict(image_size=28, width=48, num_layers=2, num_heads=4, mlp_dim=96, pos_embed_init_std=0.2),
    # Its frozen towers are random; at BERT's init range (0.02) a random Q-Former's output hardly depends on the
    # image (the LayerNorm'd learned queries dominate the small cross-attention output), where a trained one's does.
    # Its random ViT gets a stronger position embedding (std 0.2, not EVA's 0.02) so that where things are in a
    # frame, and so the direction of motion, reaches the Q-Former's output: held-out motion accuracy 81 % vs 58 %
    # in a same-data comparison (docs/results.md).
    qformer=dict(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        encoder_width=48,
        cross_attention_freq=2,
        initializer_range=0.3,
    ),
    num_query_tokens=4,
    video_qformer=dict(
        hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, encoder_width=32, cross_attention_freq=1
    ),
    num_video_query_tokens=4,
    max_frame_pos=8,
    llm=dataclasses.asdict(SIZES["tiny"]),
    # the audio branch (built when equip_audio_branch, as in the audio recipes): ImageBind towers at full input
    # size for audio (128 × 204 fbank) and at the tiny frame size for vision, 48-d joint space. The random audio
    # tower is 64 wide: at 32 its random embedding told a 300 Hz tone from an 1800 Hz one far less reliably.
    imagebind_audio=dict(width=64, num_layers=2, num_heads=4, mlp_dim=256, out_dim=48),
    imagebind_vision=dict(input_size=(28, 28), width=32, num_layers=2, num_heads=4, mlp_dim=128, out_dim=48),
    audio_qformer=dict(
        hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, encoder_width=48, cross_attention_freq=1
    ),
    num_audio_query_tokens=4,
)

# The benchmark's model (`python -m vllama_jax.bench`): the visual branch at a size where 2 CPU cores are
# compute-bound. Every matmul has inner and outer dimensions of 384 or more (a batch of 4 clips is 2,080 ViT
# tokens and 260 LLM tokens), so one step is 146 GFLOP of large dots, not dispatch or memory traffic: one step
# takes about a second, and doubling the batch about doubles its time (the report shows it). Dropout is off in
# the trainable Q-Former so that its loss can be cross-checked against PyTorch's, step by step.
BENCH = dict(
    vision=dict(image_size=112, width=512, num_layers=4, num_heads=8, mlp_dim=2048),
    qformer=dict(
        hidden_size=384, num_layers=4, num_heads=6, intermediate_size=1536, encoder_width=512, cross_attention_freq=2
    ),
    video_qformer=dict(
        hidden_size=384,
        num_layers=2,
        num_heads=6,
        intermediate_size=1536,
        encoder_width=384,
        cross_attention_freq=1,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    max_frame_pos=8,
    llm=dict(
        vocab_size=8000,
        hidden_size=1024,
        intermediate_size=2816,
        num_layers=4,
        num_heads=16,
        num_kv_heads=16,
        rms_norm_eps=1e-5,
    ),
)
SMALL_MODELS = {"tiny": TINY, "bench": BENCH}

# The original recipes (SPEC §8; LAVIS linear_warmup_cosine_lr, AdamW, weight decay 0.05), per-device-independent:
# `batch` is the global batch. Each recipe is its differences from stage 1 of the vision branch. Stage 2 starts
# from a stage-1 run's trainable weights (train.init_trainable). branch: which glue trains ("visual": the video
# Q-Former & co., "audio": the audio Q-Former & co.). The audio stages read no audio: audio_source "frames" sends
# the video frames through ImageBind's vision tower (SPEC §4).
DEFAULT_RECIPE = dict(
    batch=32,
    init_lr=1e-4,
    min_lr=8e-5,
    warmup_lr=1e-6,
    warmup_steps=2500,
    iters_per_epoch=2500,
    max_epoch=5,
    max_txt_len=32,
    end_sym="\n",
    frame_sampling="uniform",
    branch="visual",
    audio_source="frames",
)
RECIPES = {
    "vision_stage1": {},
    # cc_sbu_align + LLaVA-Instruct-150K + VideoChat-11K: point data.shards at the three vllama-prepare folders
    "vision_stage2": dict(
        batch=4,
        init_lr=3e-5,
        min_lr=1e-5,
        warmup_steps=1000,
        iters_per_epoch=1000,
        max_epoch=3,
        max_txt_len=320,
        end_sym="###",
    ),
    "audio_stage1": dict(warmup_steps=5000, iters_per_epoch=5000, branch="audio"),
    "audio_stage2": dict(
        batch=4,
        init_lr=3e-5,
        min_lr=1e-5,
        warmup_steps=400,
        iters_per_epoch=1000,
        max_epoch=3,
        max_txt_len=512,
        end_sym="###",
        branch="audio",
    ),
}
OPTIMIZER_KEYS = ("init_lr", "min_lr", "warmup_lr", "warmup_steps", "iters_per_epoch", "max_epoch")

# Stage 2's image-caption data (cc_sbu_align) is read MiniGPT-4 style: one of the original's alignment prompts
# (prompts/alignment_image.txt) at random, wrapped in the LLM's template, and the caption ends with the template's
# end symbol (the two stage-2 train configs: prompt_template and end_sym for Vicuna and for LLaMA-2-chat).
ALIGNMENT_PROMPTS = (
    "<Image><ImageHere></Image> Describe this image in detail.",
    "<Image><ImageHere></Image> Take a look at this image and describe what you notice.",
    "<Image><ImageHere></Image> Please provide a detailed description of the picture.",
    "<Image><ImageHere></Image> Could you describe the contents of this image for me?",
)


def recipe(name: str) -> dict:
    """A recipe's full row: the default row with the recipe's differences."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: expected one of {sorted(RECIPES)}")
    return {**DEFAULT_RECIPE, **RECIPES[name]}


def model(llm: str) -> dict:
    """The model config dict: full-size towers with a full-size LLM (frozen parts in bfloat16, scanned), or a
    whole small model."""
    full = dataclasses.asdict(VideoLlamaConfig())
    if llm in SMALL_MODELS:
        for key, value in SMALL_MODELS[llm].items():
            full[key] = {**full[key], **value} if isinstance(value, dict) else value
        return full
    if llm not in FULL_SIZE_LLMS:
        raise ValueError(f"unknown llm {llm!r}: expected one of {FULL_SIZE_LLMS} or {sorted(SMALL_MODELS)}")
    full["llm"] = dataclasses.asdict(SIZES[llm])
    # Frozen towers in bfloat16 (the original runs the ViT and LLaMA in fp16); the trainable video Q-Former,
    # query tokens, position embedding and llama_proj stay float32.
    for tower in ("vision", "qformer", "llm", "imagebind_audio", "imagebind_vision"):
        full[tower].update(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)
    full["vision"]["remat_policy"] = "none"
    full["llm"]["remat_policy"] = "dots_no_batch"
    return full


def get_config(arg: str = "") -> "ml_collections.ConfigDict":
    # here, not at the top: `model()` and `recipe()` are read without ml_collections and PyAV (launch/gpu_check.py)
    import ml_collections

    from vllama_jax.data.video import TRAIN_CROP_SCALE

    args = parse_arg(arg, positional=("llm", "recipe"), llm="llama2_7b_chat", recipe="vision_stage1")
    row = recipe(args.recipe)
    config = ml_collections.ConfigDict()
    config.name = f"video_llama:llm={args.llm},recipe={args.recipe}"
    config.family = "video_llama"
    config.recipe = args.recipe
    config.seed = 42
    config.model = model(args.llm)
    if row["branch"] != "visual":  # ImageBind and the audio glue; the visual branch stays
        config.model.equip_audio_branch = True
    config.data = dict(
        # "shards": data.shards / data.feature_cache; "shapes_world": the CPU demo's own clips (tiny_shapes.py)
        source="shards",
        num_frames=8,
        frame_sampling=row["frame_sampling"],
        crop_scale=TRAIN_CROP_SCALE,  # the train RandomResizedCrop's area fraction range (the original's)
        # the original's train crop casts float frames to uint8 with wrap-around (torch's .to(uint8)); False clips
        wrap_uint8=True,
        # False: crop decord's 224 x 224 frames, as the original; True: crop the native frames, one antialiased resize
        crop_native=False,
        max_txt_len=row["max_txt_len"],
        end_sym=row["end_sym"],
        # stage 2's conversation format, as the original's model_type: LLaMA-2-chat models use [INST], the rest ###
        template="llama_2" if args.llm.startswith("llama2") else "vicuna",
        tokenizer="",  # a local Hugging Face tokenizer directory (LLaMA's, for the real models)
        shards="",  # vllama-prepare output folders, comma-separated, mixed by one global shuffle
        eval_shards="",  # held-out shards, captioned greedily at the end of training (eval.json)
        # what the audio branch reads: "frames" (ImageBind's vision tower on the video frames, the paper's audio
        # stages) or "fbank" (the clips' audio track, 8 two-second fbank clips, as at inference)
        audio_source=row["audio_source"],
        clips_per_video=8,
        caption_prompts=(),  # prompts for caption samples, each with one <ImageHere> (stage 2: ALIGNMENT_PROMPTS)
        worker_count=0,  # grain worker processes decoding media (0 = threads of the training process)
        # keep each clip's decoded frames in memory after its first read (for a data set that fits; the random
        # crop still runs per example): the CPU demo turns it on
        cache_decoded=False,
        # grain reader threads in the training process (grain's default 16; 0 = read in the loop's own thread)
        read_threads=16,
        # vllama-cache output folders (comma-separated): train from the frozen towers' cached outputs instead of
        # media (data.shards is then not read; the towers' weights are not loaded for the step)
        feature_cache="",
    )
    if args.recipe.endswith("stage2"):
        prompt_template, end_sym = caption_prompt_template(config.data.template)
        config.data.update(caption_prompts=tuple(prompt_template.format(p) for p in ALIGNMENT_PROMPTS), end_sym=end_sym)
    config.eval = dict(at_end=True, batch_size=16, max_new_tokens=16, score="")
    config.batch_size = row["batch"]
    config.optimizer = dataclasses.asdict(OptimizerConfig())
    config.optimizer.update({k: row[k] for k in OPTIMIZER_KEYS})
    # frozen_checkpoint: an orbax directory holding every frozen parameter (vllama-convert's output); empty =
    # random from the seed. init_trainable: a previous run's work directory (or a trainable-parameter checkpoint)
    # whose trainable weights start this one (stage 2 from stage 1). peak_flops: per device, for MFU (0 = the
    # accelerator table, or measured on a CPU). max_nonfinite: how many steps with a non-finite loss or gradient
    # (skipped, counted) a run tolerates; one more stops it, saved, with exit status 1. keep: newest checkpoints.
    config.train = dict(
        steps=row["max_epoch"] * row["iters_per_epoch"],
        checkpoint_every=500,
        keep=3,
        max_nonfinite=10,
        log_every=50,
        frozen_checkpoint="",
        init_trainable="",
        peak_flops=0.0,
        branch=row["branch"],
    )
    if args.llm == "tiny":  # a few steps of a tiny model: what the CPU tests run
        config.data.update(num_frames=4, max_txt_len=160 if args.recipe.endswith("stage2") else 16)
        config.train.update(steps=12, checkpoint_every=4, log_every=1)
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    config.logical_axis_rules = [list(rule) for rule in DEFAULT_RULES]
    return config
