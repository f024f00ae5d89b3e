"""PyTorch references from transformers at tiny random sizes, and their weights under the ORIGINAL key names.

HF's Blip2VisionModel / Blip2QFormerModel / LlamaForCausalLM are the same networks as the original EVA ViT,
LAVIS Q-Former and LLaMA; the renames below turn their state dicts into the original layout so the weights
reach JAX through the project's own mapping (`vllama_jax.convert`), the one the converter ships.
"""
import re

import numpy as np
import torch
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (norm scales around 1), so no parameter can be silently ignored."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = re.search(r"(norm|LayerNorm)", name) and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm else scale * noise)
    return module.eval()


def numpy_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# ---- EVA ViT (Blip2VisionModel) ----

def tiny_vision(width=48, layers=2, heads=4, mlp=96, image_size=28, seed=0) -> Blip2VisionModel:
    cfg = Blip2VisionConfig(
        hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image_size, patch_size=14, qkv_bias=True, layer_norm_eps=1e-6,
    )
    model = randomize(Blip2VisionModel(cfg), seed)
    model.post_layernorm.eps = 1e-5  # ln_vision's eps in the original
    with torch.no_grad():  # the original EVA attention has a fixed-zero key bias
        for layer in model.encoder.layers:
            layer.self_attn.qkv.bias[width:2 * width] = 0.0
    return model


VISION_RENAMES = (
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
)


def eva_state_dict(model: Blip2VisionModel, prefix: str = "visual_encoder.") -> dict:
    """HF vision weights as the original `visual_encoder.*` + top-level `ln_vision.*` keys."""
    out = {}
    for key, value in numpy_state(model).items():
        if key.startswith("post_layernorm."):
            out["ln_vision." + key.split(".", 1)[1]] = value
            continue
        m = re.match(r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$", key)
        if m:  # HF packs [q_bias, 0, v_bias]; the original stores q_bias and v_bias
            q, k, v = np.split(value, 3)
            assert not k.any(), "key bias must be zero"
            out[f"{prefix}blocks.{m.group(1)}.attn.q_bias"] = q
            out[f"{prefix}blocks.{m.group(1)}.attn.v_bias"] = v
            continue
        for pattern, repl in VISION_RENAMES:
            if re.search(pattern, key):
                out[prefix + re.sub(pattern, repl, key)] = value
                break
        else:
            raise KeyError(key)
    return out


# ---- Q-Former (Blip2QFormerModel) ----

def tiny_qformer(hidden=32, layers=2, heads=4, mlp=64, encoder_width=48, freq=2, seed=0) -> Blip2QFormerModel:
    cfg = Blip2QFormerConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
        encoder_hidden_size=encoder_width, cross_attention_frequency=freq, layer_norm_eps=1e-12,
    )
    return randomize(Blip2QFormerModel(cfg), seed)


QFORMER_RENAMES = (
    (r"^layernorm\.", "bert.embeddings.LayerNorm."),
    (r"^encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.", r"bert.encoder.layer.\1.\2.self."),
    (r"^encoder\.", "bert.encoder."),
)


def qformer_state_dict(model: Blip2QFormerModel, prefix: str = "") -> dict:
    """HF Q-Former weights under the LAVIS names (`bert.embeddings.LayerNorm`, `bert.encoder.layer.N…self…`)."""
    out = {}
    for key, value in numpy_state(model).items():
        for pattern, repl in QFORMER_RENAMES:
            if re.search(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[prefix + key] = value
    return out


# ---- LLaMA ----

def tiny_llama(vocab=512, hidden=64, mlp=128, layers=2, heads=4, kv_heads=2, eps=1e-5, seed=0) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=eps, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return randomize(LlamaForCausalLM(cfg), seed)


def llama_state_dict(model: LlamaForCausalLM, prefix: str = "llama_model.") -> dict:
    """Video-LLaMA keeps HF's names below `llama_model.`."""
    return {prefix + k: v for k, v in numpy_state(model).items()}


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
