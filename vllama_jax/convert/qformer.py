"""BLIP-2 Q-Former key mapping (`Qformer.*`, `video_Qformer.*`, `audio_Qformer.*` below their prefix)."""
from __future__ import annotations

from vllama_jax.convert.mapping import Rule, expand_layers
from vllama_jax.models.qformer import QFormerConfig


def _attention_table(source: str, target: str):
    return (
        (f"{source}.self.query.weight", f"{target}/query/kernel", "linear"),
        (f"{source}.self.query.bias", f"{target}/query/bias", "bias"),
        (f"{source}.self.key.weight", f"{target}/key/kernel", "linear"),
        (f"{source}.self.key.bias", f"{target}/key/bias", "bias"),
        (f"{source}.self.value.weight", f"{target}/value/kernel", "linear"),
        (f"{source}.self.value.bias", f"{target}/value/bias", "bias"),
        (f"{source}.output.dense.weight", f"{target}/output/kernel", "linear2"),
        (f"{source}.output.dense.bias", f"{target}/output/bias", "same"),
        (f"{source}.output.LayerNorm.weight", f"{target}/output_layernorm/scale", "same"),
        (f"{source}.output.LayerNorm.bias", f"{target}/output_layernorm/bias", "same"),
    )


SELF_ATTENTION_TABLE = _attention_table("attention", "attention")
CROSS_ATTENTION_TABLE = _attention_table("crossattention", "crossattention")
QUERY_FFN_TABLE = (
    ("intermediate_query.dense.weight", "intermediate_query/kernel", "linear"),
    ("intermediate_query.dense.bias", "intermediate_query/bias", "same"),
    ("output_query.dense.weight", "output_query/kernel", "linear"),
    ("output_query.dense.bias", "output_query/bias", "same"),
    ("output_query.LayerNorm.weight", "output_query_layernorm/scale", "same"),
    ("output_query.LayerNorm.bias", "output_query_layernorm/bias", "same"),
)

SCANNED = "groups"

# What a BLIP-2 / Video-LLaMA Q-Former checkpoint holds that the query path never uses (regexes, below the
# Q-Former prefix): the text embeddings and LM head, and each layer's text FFN.
UNUSED_KEYS = (
    r"cls\..*",
    r"bert\.embeddings\.(word_embeddings|position_embeddings)\..*",
    r"bert\.embeddings\.position_ids",
    r"bert\.encoder\.layer\.\d+\.(intermediate|output)\..*",
)


def qformer_rules(config: QFormerConfig) -> list[Rule]:
    """Rules for one Q-Former, keys below its prefix (`bert.…`)."""
    rules = [
        Rule("bert.embeddings.LayerNorm.weight", "embeddings_layernorm/scale"),
        Rule("bert.embeddings.LayerNorm.bias", "embeddings_layernorm/bias"),
    ]
    freq = config.cross_attention_freq
    for n in range(config.num_layers):
        table = SELF_ATTENTION_TABLE + (CROSS_ATTENTION_TABLE if n % freq == 0 else ()) + QUERY_FFN_TABLE
        rules += expand_layers(table, f"bert.encoder.layer.{n}", f"groups_{n // freq}/layer_{n % freq}")
    return rules
