"""EVA ViT-g key mapping (`eva_vit_g.pth`, or `visual_encoder.*` in BLIP-2 / Video-LLaMA) and `ln_vision`."""
from __future__ import annotations

from vllama_jax.convert.mapping import Rule, expand_layers
from vllama_jax.models.eva_vit import EvaVitConfig

# Per block: original key suffix, our path under `blocks_{n}`, transform. The key bias is fixed zero in the
# original and absent here; qkv.weight unpacks into our query/key/value kernels.
BLOCK_TABLE = (
    ("norm1.weight", "norm1/scale", "same"),
    ("norm1.bias", "norm1/bias", "same"),
    ("attn.qkv.weight", ("attn/query/kernel", "attn/key/kernel", "attn/value/kernel"), "split3"),
    ("attn.q_bias", "attn/query/bias", "bias"),
    ("attn.v_bias", "attn/value/bias", "bias"),
    ("attn.proj.weight", "attn/proj/kernel", "linear2"),
    ("attn.proj.bias", "attn/proj/bias", "same"),
    ("norm2.weight", "norm2/scale", "same"),
    ("norm2.bias", "norm2/bias", "same"),
    ("mlp.fc1.weight", "fc1/kernel", "linear"),
    ("mlp.fc1.bias", "fc1/bias", "same"),
    ("mlp.fc2.weight", "fc2/kernel", "linear"),
    ("mlp.fc2.bias", "fc2/bias", "same"),
)

SCANNED = "blocks"  # the subtree that `scan_layers` stacks


def vit_rules(config: EvaVitConfig) -> list[Rule]:
    """Rules for the ViT alone, keys without prefix (as `eva_vit_g.pth` stores them)."""
    rules = [
        Rule("cls_token", "cls_token"),
        Rule("pos_embed", "pos_embed"),
        Rule("patch_embed.proj.weight", "patch_embed/kernel", "conv"),
        Rule("patch_embed.proj.bias", "patch_embed/bias"),
    ]
    for n in range(config.num_layers):
        rules += expand_layers(BLOCK_TABLE, f"blocks.{n}", f"blocks_{n}")
    return rules


def ln_vision_rules() -> list[Rule]:
    return [Rule("ln_vision.weight", "ln_vision/scale"), Rule("ln_vision.bias", "ln_vision/bias")]
