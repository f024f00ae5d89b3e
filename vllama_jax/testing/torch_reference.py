"""PyTorch references from transformers at random weights, and their weights under the ORIGINAL key names.

HF's Blip2VisionModel / Blip2QFormerModel / LlamaForCausalLM are the same networks as the original EVA ViT,
LAVIS Q-Former and LLaMA; the renames below turn their state dicts into the original layout so the weights
reach JAX through the project's own mapping (`vllama_jax.convert`), the one the converter ships.
`TorchVideoLlama` assembles them into the original visual branch. Used by the parity tests (tiny sizes) and
by the benchmark (`python -m vllama_jax.bench`), which trains it side by side with ours. Needs torch (the
`test` extra).
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

from vllama_jax.models.llama import SIZES


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

def vision_model(width=48, layers=2, heads=4, mlp=96, image_size=28, seed=0) -> Blip2VisionModel:
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

def qformer_model(hidden=32, layers=2, heads=4, mlp=64, encoder_width=48, freq=2, seed=0) -> Blip2QFormerModel:
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

_TINY = SIZES["tiny"]


def llama_lm(vocab=_TINY.vocab_size, hidden=_TINY.hidden_size, mlp=_TINY.intermediate_size, layers=_TINY.num_layers,
             heads=_TINY.num_heads, kv_heads=_TINY.num_kv_heads, eps=_TINY.rms_norm_eps, seed=0) -> LlamaForCausalLM:
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


TOL = 1e-5  # the parity bound: max abs difference from the PyTorch reference, float32


def report(name: str, err: float, tol: float = TOL) -> None:
    """Print a parity figure (`pytest -s -k parity` shows them) and check it against the bound."""
    print(f"[parity] {name}: max abs diff {err:.2e}")
    assert err <= tol, f"{name}: {err}"


def load(module, sample_args, state: dict, rules, scanned=()) -> dict:
    """Our parameters for `module` from an original-layout state dict, through the converter's rules."""
    import jax

    from vllama_jax.convert.video_llama import load_state_dict

    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *sample_args)["params"])
    return load_state_dict(state, rules, abstract, scanned, source_name="test state dict")


# ---- the visual branch ----

class TorchVideoLlama(torch.nn.Module):
    """The original visual-branch forward, assembled from transformers' modules (stage-1 caption loss)."""

    def __init__(self, cfg, image_token_id):
        super().__init__()
        self.image_token_id = image_token_id
        v, q, vq, llm = cfg.vision, cfg.qformer, cfg.video_qformer, cfg.llm
        self.visual_encoder = vision_model(v.width, v.num_layers, v.num_heads, v.mlp_dim, v.image_size, seed=1)
        self.Qformer = qformer_model(q.hidden_size, q.num_layers, q.num_heads, q.intermediate_size, q.encoder_width,
                                     q.cross_attention_freq, seed=2)
        self.video_Qformer = qformer_model(
            vq.hidden_size,
            vq.num_layers,
            vq.num_heads,
            vq.intermediate_size,
            vq.encoder_width,
            vq.cross_attention_freq,
            seed=3,
        )
        self.llama_model = llama_lm(
            llm.vocab_size,
            llm.hidden_size,
            llm.intermediate_size,
            llm.num_layers,
            llm.num_heads,
            llm.num_kv_heads,
            llm.rms_norm_eps,
            seed=4,
        )
        gen = torch.Generator().manual_seed(5)
        self.query_tokens = torch.nn.Parameter(torch.randn(1, cfg.num_query_tokens, q.hidden_size, generator=gen))
        self.video_query_tokens = torch.nn.Parameter(
            torch.randn(1, cfg.num_video_query_tokens, vq.hidden_size, generator=gen)
        )
        with torch.random.fork_rng():  # their default inits draw from the global generator: seed it, then restore it
            torch.manual_seed(6)
            self.video_frame_position_embedding = torch.nn.Embedding(cfg.max_frame_pos, q.hidden_size)
            self.llama_proj = torch.nn.Linear(vq.hidden_size, llm.hidden_size)
        self.eval()

    def forward(self, frames, input_ids, attention_mask, labels):
        b, t = frames.shape[:2]
        image_embeds = self.visual_encoder(pixel_values=frames.flatten(0, 1)).last_hidden_state
        q = self.Qformer(
            query_embeds=self.query_tokens.expand(b * t, -1, -1), encoder_hidden_states=image_embeds
        ).last_hidden_state
        positions = self.video_frame_position_embedding(torch.arange(t, device=q.device))  # on the model's device
        q = q.view(b, t, q.shape[1], -1) + positions[None, :, None, :]
        video = self.video_Qformer(
            query_embeds=self.video_query_tokens.expand(b, -1, -1), encoder_hidden_states=q.flatten(1, 2)
        ).last_hidden_state
        soft = self.llama_proj(video)
        is_image = input_ids == self.image_token_id
        embeds = self.llama_model.model.embed_tokens(input_ids.masked_fill(is_image, 0))
        embeds[is_image] = soft.reshape(-1, soft.shape[-1])
        out = self.llama_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)
        return out.loss, out.logits, soft

    def original_state_dict(self):
        state = {
            **eva_state_dict(self.visual_encoder),
            **qformer_state_dict(self.Qformer, "Qformer."),
            **qformer_state_dict(self.video_Qformer, "video_Qformer."),
            **llama_state_dict(self.llama_model),
        }
        for name in (
            "query_tokens",
            "video_query_tokens",
            "video_frame_position_embedding.weight",
            "llama_proj.weight",
            "llama_proj.bias",
        ):
            state[name] = self.state_dict()[name].numpy().copy()
        # what real checkpoints also carry, dropped on purpose
        state["Qformer.bert.embeddings.position_ids"] = np.arange(512)[None]
        state["llama_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
        return state
