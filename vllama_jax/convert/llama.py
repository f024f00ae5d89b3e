"""LLaMA key mapping: Hugging Face `LlamaForCausalLM` names (`llama_model.*` in Video-LLaMA)."""
from __future__ import annotations

from vllama_jax.convert.mapping import Rule, expand_layers
from vllama_jax.models.llama import LlamaConfig

LAYER_TABLE = (
    ("self_attn.q_proj.weight", "self_attn/q_proj/kernel", "linear"),
    ("self_attn.k_proj.weight", "self_attn/k_proj/kernel", "linear"),
    ("self_attn.v_proj.weight", "self_attn/v_proj/kernel", "linear"),
    ("self_attn.o_proj.weight", "self_attn/o_proj/kernel", "linear2"),
    ("mlp.gate_proj.weight", "gate_proj/kernel", "linear"),
    ("mlp.up_proj.weight", "up_proj/kernel", "linear"),
    ("mlp.down_proj.weight", "down_proj/kernel", "linear"),
    ("input_layernorm.weight", "input_layernorm/scale", "same"),
    ("post_attention_layernorm.weight", "post_attention_layernorm/scale", "same"),
)

SCANNED = "decoder/layers"

# Buffers some checkpoints carry (Video-LLaMA's copy saves the rotary inverse frequencies per layer).
UNUSED_KEYS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def llama_rules(config: LlamaConfig) -> list[Rule]:
    rules = [
        Rule("model.embed_tokens.weight", "embed_tokens/embedding"),
        Rule("model.norm.weight", "decoder/norm/scale"),
        Rule("lm_head.weight", "lm_head/kernel", "linear"),
    ]
    for n in range(config.num_layers):
        rules += expand_layers(LAYER_TABLE, f"model.layers.{n}", f"decoder/layers_{n}")
    return rules
