"""Parity with transformers' PyTorch models at tiny random sizes, fp32, max abs diff <= 1e-5.

Weights travel torch -> JAX through `vllama_jax.convert` starting from the original Video-LLaMA key names
(see hf_reference.py). Each test prints its measured error (`pytest -s -k parity` shows them).
"""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from vllama_jax.testing import torch_reference as ref
from vllama_jax.testing.torch_reference import TorchVideoLlama
from vllama_jax.config import model_config
from vllama_jax.convert import eva_vit as eva_map
from vllama_jax.convert import llama as llama_map
from vllama_jax.convert import qformer as qformer_map
from vllama_jax.convert.mapping import prefixed
from vllama_jax.convert.video_llama import UNUSED_KEYS, export_state_dict, load_state_dict, scanned_subtrees, video_llama_rules
from vllama_jax.models.eva_vit import EvaVisionTransformer, EvaVitConfig, ln_vision
from vllama_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_cache
from vllama_jax.models.qformer import QFormer, QFormerConfig
from vllama_jax.models.video_llama import VideoLlama, causal_lm_loss

TOL = 1e-5


def report(name, err):
    print(f"[parity] {name}: max abs diff {err:.2e}")
    assert err <= TOL, f"{name}: {err}"


def load(module, sample_args, state, rules, scanned=()):
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *sample_args)["params"])
    return load_state_dict(state, rules, abstract, scanned, source_name="test state dict")


class VisionWithLn(nn.Module):
    config: EvaVitConfig

    @nn.compact
    def __call__(self, frames):
        return ln_vision(self.config)(EvaVisionTransformer(self.config, name="visual_encoder")(frames))


@pytest.mark.parametrize("scan", [False, True])
def test_vit_and_ln_vision_parity(scan):
    torch_model = ref.vision_model(width=48, layers=3, heads=4, mlp=96, image_size=42)
    cfg = EvaVitConfig(image_size=42, width=48, num_layers=3, num_heads=4, mlp_dim=96, scan_layers=scan)
    rules = prefixed(eva_map.vit_rules(cfg), "visual_encoder.", "visual_encoder") + eva_map.ln_vision_rules()
    x = np.random.default_rng(0).standard_normal((2, 42, 42, 3)).astype(np.float32)
    scanned = [("visual_encoder/blocks", 3)] if scan else []
    params = load(VisionWithLn(cfg), (x,), ref.eva_state_dict(torch_model), rules, scanned)
    ours = VisionWithLn(cfg).apply({"params": params}, x)
    with torch.no_grad():
        theirs = torch_model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    assert ours.shape == theirs.shape == (2, 10, 48)
    report(f"ViT + ln_vision (scan={scan})", ref.max_abs(ours, theirs))


@pytest.mark.parametrize(
    "freq,layers,encoder_width,scan",
    # the last: the audio Q-Former's shape, reading ImageBind's 1024-d embeddings
    [(2, 4, 48, False), (2, 4, 48, True), (1, 2, 40, False), (1, 2, 40, True), (1, 2, 1024, True)],
)
def test_qformer_parity(freq, layers, encoder_width, scan):
    torch_model = ref.qformer_model(hidden=32, layers=layers, encoder_width=encoder_width, freq=freq)
    cfg = QFormerConfig(
        hidden_size=32, num_layers=layers, num_heads=4, intermediate_size=64, encoder_width=encoder_width,
        cross_attention_freq=freq, scan_layers=scan,
    )
    rng = np.random.default_rng(1)
    query = rng.standard_normal((2, 6, 32)).astype(np.float32)
    encoder = rng.standard_normal((2, 9, encoder_width)).astype(np.float32)
    mask = np.ones((2, 9), np.int64)
    mask[1, 5:] = 0  # the second row sees only five encoder positions
    scanned = [("groups", layers // freq)] if scan else []
    params = load(QFormer(cfg), (query, encoder), ref.qformer_state_dict(torch_model), qformer_map.qformer_rules(cfg), scanned)
    with torch.no_grad():
        for encoder_mask in (None, mask):
            theirs = torch_model(
                query_embeds=torch.from_numpy(query),
                encoder_hidden_states=torch.from_numpy(encoder),
                encoder_attention_mask=None if encoder_mask is None else torch.from_numpy(encoder_mask),
            ).last_hidden_state.numpy()
            ours = QFormer(cfg).apply({"params": params}, query, encoder, encoder_mask)
            masked = "masked" if encoder_mask is not None else "unmasked"
            report(f"Q-Former freq={freq} width={encoder_width} scan={scan} {masked}", ref.max_abs(ours, theirs))


def llama_pair(kv_heads, scan):
    torch_model = ref.llama_lm(kv_heads=kv_heads)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
        rms_norm_eps=1e-5, scan_layers=scan,
    )
    ids = np.zeros((2, 4), np.int32)
    rules = prefixed(llama_map.llama_rules(cfg), "llama_model.", "")
    scanned = [("decoder/layers", 2)] if scan else []
    params = load(LlamaForCausalLM(cfg), (ids,), ref.llama_state_dict(torch_model), rules, scanned)
    return torch_model, cfg, params


def hf_logits(torch_model, ids, mask, positions=None):
    with torch.no_grad():
        out = torch_model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            position_ids=None if positions is None else torch.from_numpy(positions).long(),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("kv_heads,scan", [(4, False), (2, False), (2, True)])
def test_llama_logits_parity(kv_heads, scan):
    torch_model, cfg, params = llama_pair(kv_heads, scan)
    model = LlamaForCausalLM(cfg)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 512, (2, 11)).astype(np.int32)
    name = f"LLaMA kv_heads={kv_heads} scan={scan}"
    full = np.ones((2, 11), bool)
    report(f"{name} no padding", ref.max_abs(model.apply({"params": params}, ids), hf_logits(torch_model, ids, full)))
    right = full.copy()
    right[1, 7:] = False
    ours = np.asarray(model.apply({"params": params}, ids, padding_mask=right))
    report(f"{name} right padding", ref.max_abs(ours[right], hf_logits(torch_model, ids, right)[right]))
    left = full.copy()
    left[0, :4] = False
    positions = np.maximum(np.cumsum(left, axis=1) - 1, 0)
    ours = np.asarray(model.apply({"params": params}, ids, padding_mask=left, positions=positions))
    report(f"{name} left padding", ref.max_abs(ours[left], hf_logits(torch_model, ids, left, positions)[left]))


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_reproduces_full_forward(scan):
    _, cfg, params = llama_pair(2, scan)
    model = LlamaForCausalLM(cfg)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 512, (2, 12)).astype(np.int32)
    mask = np.ones((2, 12), bool)
    mask[1, :3] = False  # row 1: a shorter prompt, left-padded
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    full = np.asarray(model.apply({"params": params}, ids, padding_mask=mask, positions=positions))

    step = jax.jit(
        lambda p, cache, tok, m, pos: model.apply({"params": p, "cache": cache}, tok, padding_mask=m, positions=pos, decode=True, mutable=["cache"])
    )
    cache = init_cache(model, params, batch_size=2, max_length=16)
    prompt = 7
    logits, state = step(params, cache, ids[:, :prompt], mask[:, :prompt], positions[:, :prompt])
    errors = [ref.max_abs(np.asarray(logits)[mask[:, :prompt]], full[:, :prompt][mask[:, :prompt]])]
    cache = state["cache"]
    for t in range(prompt, 12):
        logits, state = step(params, cache, ids[:, t:t + 1], mask[:, t:t + 1], positions[:, t:t + 1])
        cache = state["cache"]
        errors.append(ref.max_abs(logits[:, 0], full[:, t]))
        assert (np.asarray(logits[:, 0]).argmax(-1) == full[:, t].argmax(-1)).all()
    report(f"cached decoding vs full forward (scan={scan})", max(errors))


def test_cache_overflow_is_loud_not_wrong():
    _, cfg, params = llama_pair(2, False)
    model = LlamaForCausalLM(cfg)
    cache = init_cache(model, params, batch_size=1, max_length=4)
    ids = np.arange(3, 9, dtype=np.int32)[None]
    step = lambda cache, tok, pos: model.apply(  # noqa: E731
        {"params": params, "cache": cache}, tok, positions=pos, decode=True, mutable=["cache"])
    logits, state = step(cache, ids[:, :4], np.arange(4)[None])
    assert np.isfinite(np.asarray(logits)).all()
    logits, _ = step(state["cache"], ids[:, 4:5], np.array([[4]]))  # a fifth token into a 4-slot cache
    assert np.isnan(np.asarray(logits)).all()


@pytest.mark.parametrize("scan", [False, True])
def test_video_llama_branch_and_caption_loss_parity(tiny_config, scan):
    cfg = dataclasses.replace(model_config(tiny_config), image_token_id=512)
    if scan:
        cfg = dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), scan_layers=True) for k in ("vision", "qformer", "video_qformer", "llm")})
    torch_model = TorchVideoLlama(cfg, 512)
    rng = np.random.default_rng(4)
    frames = rng.standard_normal((2, 3, 28, 28, 3)).astype(np.float32)
    ids = rng.integers(3, 500, (2, 14)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 1:5] = 512
    mask = np.ones((2, 14), bool)
    mask[1, 11:] = False
    labels = np.where((np.arange(14) >= 5) & mask, ids, -100).astype(np.int32)

    model = VideoLlama(cfg)
    state = torch_model.original_state_dict()
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), frames, ids)["params"])
    params = load_state_dict(state, video_llama_rules(cfg), abstract, scanned_subtrees(cfg), ignore=UNUSED_KEYS)
    logits, soft = jax.jit(model.apply)({"params": params}, frames, ids, mask)
    loss, _ = causal_lm_loss(logits, labels)
    with torch.no_grad():
        t_loss, t_logits, t_soft = torch_model(
            torch.from_numpy(frames).permute(0, 1, 4, 2, 3), torch.from_numpy(ids).long(), torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(labels).long()
        )
    report(f"Video-LLaMA soft tokens (scan={scan})", ref.max_abs(soft["video"], t_soft.numpy()))
    report(f"Video-LLaMA logits (scan={scan})", ref.max_abs(np.asarray(logits)[mask], t_logits.numpy()[mask]))
    report(f"Video-LLaMA caption loss (scan={scan})", abs(float(loss) - float(t_loss)))
    # and back: export gives the original tensors, key for key, bit for bit
    exported = export_state_dict(params, video_llama_rules(cfg), [p for p, _ in scanned_subtrees(cfg)])
    kept = {k: v for k, v in state.items() if not any(__import__("re").fullmatch(p, k) for p in UNUSED_KEYS)}
    assert exported.keys() == kept.keys()
    for key, value in kept.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    # an image: the original's 1-frame video, against ours batched as 3 copies with frame_mask [1, 0, 0]
    image = frames[:, :1]
    with torch.no_grad():
        _, t_image_logits, t_image_soft = torch_model(torch.from_numpy(image).permute(0, 1, 4, 2, 3), torch.from_numpy(ids).long(),
                                                      torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(labels).long())
    frame_mask = np.array([[True, False, False]] * 2)
    image_logits, image_soft = jax.jit(model.apply)({"params": params}, np.repeat(image, 3, axis=1), ids, mask,
                                                     frame_mask=frame_mask)
    report(f"image as 3 masked frames vs the original's 1 frame: soft tokens (scan={scan})",
           ref.max_abs(image_soft["video"], t_image_soft.numpy()))
    report(f"image as 3 masked frames vs the original's 1 frame: logits (scan={scan})",
           ref.max_abs(np.asarray(image_logits)[mask], t_image_logits.numpy()[mask]))
