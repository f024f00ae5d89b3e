"""ImageBind-huge key mapping (`imagebind_huge.pth`, or `audio_encoder.*` in Video-LLaMA): audio and vision towers.

The text, depth, thermal and IMU modalities are in every ImageBind file but unused by Video-LLaMA: dropped on
purpose (`UNUSED_KEYS`). `in_proj_weight` / `in_proj_bias` are torch's packed q/k/v and unpack into three
projections; the vision stem is a Conv3d inside a Sequential (`rgbt_stem.proj.1`), the audio stem a bare Conv2d.
"""
from __future__ import annotations

from vllama_jax.convert.mapping import Rule, expand_layers
from vllama_jax.models.imagebind import ImageBindTowerConfig

QKV = ("attn/query/{}", "attn/key/{}", "attn/value/{}")
BLOCK_TABLE = (
    ("attn.in_proj_weight", tuple(p.format("kernel") for p in QKV), "split3"),
    ("attn.in_proj_bias", tuple(p.format("bias") for p in QKV), "split3_bias"),
    ("attn.out_proj.weight", "attn/out_proj/kernel", "linear2"),
    ("attn.out_proj.bias", "attn/out_proj/bias", "same"),
    ("norm_1.weight", "norm_1/scale", "same"),
    ("norm_1.bias", "norm_1/bias", "same"),
    ("norm_2.weight", "norm_2/scale", "same"),
    ("norm_2.bias", "norm_2/bias", "same"),
    ("mlp.fc1.weight", "fc1/kernel", "linear"),
    ("mlp.fc1.bias", "fc1/bias", "same"),
    ("mlp.fc2.weight", "fc2/kernel", "linear"),
    ("mlp.fc2.bias", "fc2/bias", "same"),
)
BIAS_KV_TABLE = (("attn.bias_k", "attn/bias_k", "same"), ("attn.bias_v", "attn/bias_v", "same"))

SCANNED = "blocks"

UNUSED_KEYS = (r"modality_(preprocessors|trunks|heads|postprocessors)\.(text|depth|thermal|imu)\..*",)


def tower_rules(config: ImageBindTowerConfig) -> list[Rule]:
    """Rules for one tower, keys as `imagebind_huge.pth` stores them, parameters below the tower's name."""
    m, name = config.modality, config.modality
    stem = f"modality_preprocessors.{m}.rgbt_stem.proj" + (".1" if m == "vision" else "")
    rules = [
        Rule(f"modality_preprocessors.{m}.cls_token", f"{name}/cls_token"),
        Rule(f"modality_preprocessors.{m}.pos_embedding_helper.pos_embed", f"{name}/pos_embed"),
        Rule(f"{stem}.weight", f"{name}/stem/kernel", "conv"),
    ]
    if config.stem_norm_eps:
        rules += [Rule(f"modality_preprocessors.{m}.rgbt_stem.norm_layer.weight", f"{name}/stem_norm/scale"),
                  Rule(f"modality_preprocessors.{m}.rgbt_stem.norm_layer.bias", f"{name}/stem_norm/bias")]
    if config.pre_transformer_norm:
        rules += [Rule(f"modality_trunks.{m}.pre_transformer_layer.0.weight", f"{name}/pre_norm/scale"),
                  Rule(f"modality_trunks.{m}.pre_transformer_layer.0.bias", f"{name}/pre_norm/bias")]
    table = BLOCK_TABLE + (BIAS_KV_TABLE if config.add_bias_kv else ())
    for n in range(config.num_layers):
        rules += expand_layers(table, f"modality_trunks.{m}.blocks.{n}", f"{name}/blocks_{n}")
    rules += [
        Rule(f"modality_heads.{m}.0.weight", f"{name}/head_norm/scale"),
        Rule(f"modality_heads.{m}.0.bias", f"{name}/head_norm/bias"),
        Rule(f"modality_heads.{m}.2.weight", f"{name}/head/kernel", "linear"),
    ]
    if config.logit_scale:
        rules.append(Rule(f"modality_postprocessors.{m}.1.log_logit_scale", f"{name}/log_logit_scale"))
    return rules


def imagebind_rules(audio: ImageBindTowerConfig, vision: ImageBindTowerConfig) -> list[Rule]:
    return [*tower_rules(audio), *tower_rules(vision)]
