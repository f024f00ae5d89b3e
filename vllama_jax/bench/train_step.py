"""Our jitted stage-1 train step against the same step in PyTorch, its roofline, its parts, and the
frozen-feature cache's step.

The PyTorch peer is the visual branch assembled from transformers' modules (`torch_reference.TorchVideoLlama`:
Blip2VisionModel + Blip2QFormerModel for the image and the video Q-Former + frame position embedding +
llama_proj + LlamaForCausalLM), frozen parts with requires_grad=False, eager float32, torch.optim.AdamW with the
recipe's betas, epsilon, weight-decay split and learning-rate schedule. Ours gets the same weights through the
checkpoint converter. Both train on the same batch; their losses are compared step by step before any timing.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vllama_jax.config import model_config
from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.convert.video_llama import UNUSED_KEYS, load_state_dict, scanned_subtrees, video_llama_rules
from vllama_jax.models.video_llama import VISUAL_TRAINABLE, VideoLlama, causal_lm_loss
from vllama_jax.sharding import make_mesh, unboxed
from vllama_jax.train.flops import compiled_flops, lowered_flops, scan_aware_flops
from vllama_jax.train.optimizer import OptimizerConfig, lavis_warmup_cosine
from vllama_jax.train.step import init_state


def bench_model_config(config):
    """The config's model with `<ImageHere>` just past the vocabulary (as LLaMA's tokenizer places it)."""
    cfg = model_config(config)
    return dataclasses.replace(cfg, image_token_id=cfg.llm.vocab_size)


def make_batch(model_cfg, batch_size: int, num_frames: int, max_txt_len: int, seed: int = 0) -> dict:
    """A stage-1 batch: random video frames (all real), [BOS] + <ImageHere> × 32 + caption tokens, a few rows
    padded at the end."""
    rng = np.random.default_rng(seed)
    size, soft = model_cfg.vision.image_size, model_cfg.num_video_query_tokens
    length = 1 + soft + max_txt_len
    ids = rng.integers(3, model_cfg.llm.vocab_size, (batch_size, length)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 1:1 + soft] = model_cfg.image_token_id
    mask = np.ones((batch_size, length), bool)
    for row in range(1, batch_size, 2):
        mask[row, length - 1 - row:] = False
    labels = np.where((np.arange(length) > soft) & mask, ids, IGNORE_INDEX).astype(np.int32)
    frames = rng.standard_normal((batch_size, num_frames, size, size, 3)).astype(np.float32)
    return {"frames": frames, "frame_mask": np.ones((batch_size, num_frames), bool), "input_ids": ids,
            "padding_mask": mask, "labels": labels}


class TorchTrainer:
    """One PyTorch training step of the visual branch: forward, backward into the trainable parts, AdamW.

    `device`: where the model and batches go. `autocast`: None (float32, the benchmark's), "bfloat16" or "float16":
    the forward runs under `torch.autocast` in that dtype and the frozen parameters are stored in it, as the
    original stores its ViT and LLaMA in fp16 and trains under fp16 autocast (LAVIS's `amp`); float16 scales the
    loss with a GradScaler, as LAVIS's runner does. The trainable parameters stay float32."""

    def __init__(self, torch_model, opt_cfg: OptimizerConfig, device: str = "cpu", autocast: str | None = None):
        import torch

        self.torch, self.model, self.device = torch, torch_model, torch.device(device)
        self.dtype = None if autocast is None else {"bfloat16": torch.bfloat16, "float16": torch.float16}[autocast]
        decay, no_decay = [], []
        for name, p in torch_model.named_parameters():
            p.requires_grad_(name.split(".")[0] in VISUAL_TRAINABLE)
            if p.requires_grad:  # as the recipe: no weight decay on biases and vectors
                (decay if p.ndim >= 2 else no_decay).append(p)
            elif self.dtype is not None:
                p.data = p.data.to(self.dtype)
        torch_model.to(self.device)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opt_cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=opt_cfg.warmup_lr, betas=(0.9, opt_cfg.beta2), eps=1e-8)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.schedule = lavis_warmup_cosine(opt_cfg)
        self.steps = 0

    def batch(self, batch: dict) -> dict:
        t = self.torch
        tensors = {"frames": t.from_numpy(batch["frames"]).permute(0, 1, 4, 2, 3).contiguous(),
                   "input_ids": t.from_numpy(batch["input_ids"]).long(),
                   "attention_mask": t.from_numpy(batch["padding_mask"].astype(np.int64)),
                   "labels": t.from_numpy(batch["labels"]).long()}
        return {k: v.to(self.device) for k, v in tensors.items()}

    def step(self, batch: dict) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.schedule(self.steps))
        if self.dtype is None:
            loss, _, _ = self.model(**batch)
        else:
            with self.torch.autocast(self.device.type, dtype=self.dtype):
                loss, _, _ = self.model(**batch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.steps += 1
        return float(loss.detach())  # waits for the step to finish (on a GPU too)


def ours_from_torch(config, model_cfg, torch_model, batch_size: int, text_length: int, cached: bool = False):
    """(build, state, frozen): our step on one device, with the PyTorch model's weights (through the converter)."""
    from vllama_jax.train.sharded import build_sharded_step  # here: the GPU check imports this file without grain

    build = build_sharded_step(config, model_cfg, text_length, mesh=make_mesh((1, 1, 1), jax.devices()[:1]),
                               batch_size=batch_size, cached=cached)
    params = load_state_dict(torch_model.original_state_dict(), video_llama_rules(model_cfg),
                             unboxed(build.model.boxed_params), scanned_subtrees(model_cfg), ignore=UNUSED_KEYS,
                             source_name="the PyTorch benchmark model")
    trainable, frozen = build.model.split(jax.tree_util.tree_map(jnp.asarray, params))
    state = init_state(trainable, build.optimizer, jax.random.PRNGKey(build.state_seed))
    frozen = {k: v for k, v in frozen.items() if k in build.frozen_names}
    return build, state, frozen, params


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measured_peak(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one large float32 `jnp.dot` (size × size), best of `repeats`: the machine's matmul peak."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def compare_train_steps(config, batch_size: int, check_steps: int, timed_steps: int, tolerance: float = 1e-4,
                        log=print) -> dict:
    """Train both for `check_steps` on one batch (losses must agree to `tolerance`), then time `timed_steps` more.
    Raises AssertionError when the losses disagree."""
    import torch

    from vllama_jax.testing.torch_reference import TorchVideoLlama

    model_cfg = bench_model_config(config)
    opt_cfg = OptimizerConfig(**config.optimizer.to_dict())
    batch = make_batch(model_cfg, batch_size, config.data.num_frames, config.data.max_txt_len)
    text_length = batch["input_ids"].shape[1]
    torch_model = TorchVideoLlama(model_cfg, model_cfg.image_token_id)
    torch_trainer = TorchTrainer(torch_model, opt_cfg)
    build, state, frozen, _ = ours_from_torch(config, model_cfg, torch_model, batch_size, text_length)
    ours_batch = {k: jnp.asarray(batch[k]) for k in build.batch}
    started = time.perf_counter()
    compiled = build.step_fn.lower(state, frozen, ours_batch).compile()
    compile_seconds = time.perf_counter() - started
    flops = compiled_flops(compiled)

    losses = {"ours": [], "pytorch": []}
    theirs_batch = torch_trainer.batch(batch)
    for _ in range(check_steps):
        state, metrics = compiled(state, frozen, ours_batch)
        losses["ours"].append(float(metrics["loss"]))
        losses["pytorch"].append(torch_trainer.step(theirs_batch))
    worst = max(abs(a - b) for a, b in zip(losses["ours"], losses["pytorch"]))
    log(f"loss cross-check over {check_steps} steps: ours {losses['ours']}, PyTorch {losses['pytorch']}, "
        f"max diff {worst:.2e}")
    if not worst <= tolerance:
        raise AssertionError(f"our train step's loss differs from PyTorch's by {worst:.3e} > {tolerance}: {losses}")

    def ours_step():
        nonlocal state
        state, metrics = compiled(state, frozen, ours_batch)
        jax.block_until_ready(metrics["loss"])

    ours_seconds = _median_time(ours_step, timed_steps)
    theirs_seconds = _median_time(lambda: torch_trainer.step(theirs_batch), timed_steps)
    return {
        "batch_size": batch_size,
        "text_length": text_length,
        "frames": config.data.num_frames,
        "image_size": model_cfg.vision.image_size,
        "losses": losses,
        "max_loss_diff": worst,
        "step_flops": flops,
        "compile_seconds": round(compile_seconds, 1),
        "ours_seconds": ours_seconds,
        "pytorch_seconds": theirs_seconds,
        "speedup": theirs_seconds / ours_seconds,
        "torch_threads": torch.get_num_threads(),
        "parameters": count_parameters(torch_model),
    }


def count_parameters(torch_model) -> dict:
    trainable = sum(p.numel() for p in torch_model.parameters() if p.requires_grad)
    return {"trainable": trainable, "frozen": sum(p.numel() for p in torch_model.parameters()) - trainable}


def step_parts(config, batch_size: int, repeats: int) -> list[dict]:
    """Time and FLOPs of the step's parts, each jitted on its own with the bench model's (random) weights:
    the frozen towers' forward (ViT + ln_vision, image Q-Former), the trainable glue's forward and backward,
    the LLM's forward (to the loss) and its backward (to the soft tokens: timed as forward + backward, less the
    forward). What the parts do not cover is the optimizer update, the splice and what XLA overlaps or fuses
    across part boundaries inside the one-program step."""
    model_cfg = bench_model_config(config)
    model = VideoLlama(model_cfg)
    batch = make_batch(model_cfg, batch_size, config.data.num_frames, config.data.max_txt_len)
    frames = jnp.asarray(batch["frames"])
    params = nn.unbox(model.init(jax.random.key(0), frames[:1, :1], jnp.asarray(batch["input_ids"][:1]))["params"])
    ids, mask, labels = (jnp.asarray(batch[k]) for k in ("input_ids", "padding_mask", "labels"))
    b, t = frames.shape[:2]
    apply = lambda method, *a, **kw: model.apply({"params": params}, *a, method=method, **kw)  # noqa: E731

    vit = lambda f: apply(lambda m, x: m.ln_vision(m.visual_encoder(x)), f.reshape(b * t, *f.shape[2:]))  # noqa: E731
    image_embeds = jax.jit(vit)(frames)

    def image_qformer(embeds):
        return apply(
            lambda m, e: m.Qformer(
                jnp.broadcast_to(m.query_tokens, (b * t, *m.query_tokens.shape[1:])), e, deterministic=True
            ),
            embeds,
        )

    features = jax.jit(image_qformer)(image_embeds).reshape(b, t, model_cfg.num_query_tokens, -1)
    trainable = {k: params[k] for k in VISUAL_TRAINABLE}

    def glue(train_params, feats):
        soft = model.apply({"params": {**params, **train_params}}, None, features=feats, method=VideoLlama.encode_video)
        return soft.sum(), soft

    def glue_fwd_bwd(feats):
        return jax.grad(lambda p: glue(p, feats)[0])(trainable)

    soft = jax.jit(lambda f: glue(trainable, f)[1])(features)

    def llm_loss(soft_tokens):
        embeds = apply(VideoLlama.splice, ids, soft_tokens)
        logits = apply(lambda m, **kw: m.llama_model(**kw), inputs_embeds=embeds, padding_mask=mask)
        return causal_lm_loss(logits, labels)[0]

    parts = [
        ("ViT + ln_vision (frozen, forward)", vit, frames),
        ("image Q-Former (frozen, forward)", image_qformer, image_embeds),
        ("video Q-Former + llama_proj (forward + backward)", glue_fwd_bwd, features),
        ("LLM forward (to the loss)", llm_loss, soft),
        ("LLM forward + backward (to the soft tokens)", jax.grad(llm_loss), soft),
    ]
    out = []
    for name, fn, arg in parts:
        compiled = jax.jit(fn).lower(arg).compile()
        jax.block_until_ready(compiled(arg))
        seconds = _median_time(lambda: jax.block_until_ready(compiled(arg)), repeats)
        out.append({"part": name, "seconds": seconds, "flops": compiled_flops(compiled)})
    forward, both = out[-2], out.pop()  # the backward alone = forward + backward − forward
    out.append(
        {
            "part": "LLM backward (to the soft tokens)",
            "seconds": max(both["seconds"] - forward["seconds"], 1e-9),
            "flops": both["flops"] - forward["flops"],
        }
    )
    return out


def feature_cache_cost(config, full_config, batch_size: int, repeats: int, *, compile_full: bool = True) -> dict:
    """The cached step against the end-to-end step: FLOPs at full size (XLA cost analysis of both on abstract
    inputs, one example, one device) and measured time at the bench config. `compile_full=False` (--quick) reads
    the full-size counts off the lowered programs, before XLA optimises them: about 5x faster, 0.3 % below the
    compiled count for the end-to-end step (6.042e12 vs 6.062e12 FLOPs, llama2_7b_chat, measured 2026-12-02)."""

    from vllama_jax.train.sharded import build_sharded_step, step_flops

    def full_flops(cached: bool) -> float:
        model_cfg = model_config(full_config)
        text = 1 + model_cfg.num_video_query_tokens + full_config.data.max_txt_len
        mesh = make_mesh((1, 1, 1), jax.devices()[:1])
        if compile_full:
            return step_flops(full_config, model_cfg, text, mesh=mesh, batch_size=1, cached=cached)
        return scan_aware_flops(
            model_cfg,
            lambda m: lowered_flops(build_sharded_step(full_config, m, text, mesh=mesh, batch_size=1, cached=cached)
                                    .lower()),
        )

    from vllama_jax.testing.torch_reference import TorchVideoLlama

    model_cfg = bench_model_config(config)
    batch = make_batch(model_cfg, batch_size, config.data.num_frames, config.data.max_txt_len)
    torch_model = TorchVideoLlama(model_cfg, model_cfg.image_token_id)
    text_length = batch["input_ids"].shape[1]
    measured = {}
    for cached in (False, True):
        build, state, frozen, params = ours_from_torch(config, model_cfg, torch_model, batch_size, text_length, cached)
        inputs = dict(batch)
        if cached:
            inputs["video_features"] = np.asarray(
                jax.jit(lambda p, f: VideoLlama(model_cfg).apply({"params": p}, f, method=VideoLlama.frame_features))(
                    params, batch["frames"]
                )
            )
        inputs = {k: jnp.asarray(inputs[k]) for k in build.batch}
        compiled = build.step_fn.lower(state, frozen, inputs).compile()
        state, metrics = compiled(state, frozen, inputs)
        jax.block_until_ready(metrics["loss"])

        def step():
            nonlocal state
            state, m = compiled(state, frozen, inputs)
            jax.block_until_ready(m["loss"])

        measured[cached] = {
            "seconds": _median_time(step, repeats),
            "flops": compiled_flops(compiled),
            "first_loss": float(metrics["loss"]),
        }
    full = {cached: full_flops(cached) for cached in (False, True)}
    return {
        "full_size_config": full_config.name,
        "full_flops_from": "compiled" if compile_full else "lowered",
        "full_flops_end_to_end": full[False],
        "full_flops_cached": full[True],
        "full_flops_ratio": full[False] / full[True],
        "bench_end_to_end": measured[False],
        "bench_cached": measured[True],
        "bench_flops_ratio": measured[False]["flops"] / measured[True]["flops"],
        "bench_time_ratio": measured[False]["seconds"] / measured[True]["seconds"],
        "same_first_loss": abs(measured[False]["first_loss"] - measured[True]["first_loss"]),
    }
