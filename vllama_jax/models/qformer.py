"""The BLIP-2 Q-Former, query path only (what Video-LLaMA runs for the image, video and audio Q-Formers).

Post-LN BERT blocks over learned query tokens: LayerNorm on the queries (`bert.embeddings.LayerNorm`), then per
layer self-attention → cross-attention into the encoder states (layer i has one iff i % cross_attention_freq == 0)
→ the query FFN (`intermediate_query` / `output_query`). The text path (word embeddings, text FFN) is not built:
Video-LLaMA deletes it. LayerNorm eps 1e-12, exact GELU. Dropout (BERT's 0.1) applies when not deterministic,
since the video and audio Q-Formers train in PyTorch's train mode.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from vllama_jax.models import layers


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    encoder_width: int = 1408
    cross_attention_freq: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02  # std of the normal init of every dense kernel (BERT's and HF's field)
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"  # layers.ATTENTION_IMPLS: 'xla', 'dot_product_attention', 'splash'

    def __post_init__(self):
        layers.check_attention_impl(self.attention_impl, "QFormerConfig")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_groups(self) -> int:
        """Layers are built in groups of `cross_attention_freq`: the first of each has cross-attention."""
        if self.num_layers % self.cross_attention_freq:
            raise ValueError(
                f"Q-Former num_layers={self.num_layers} must be a multiple of "
                f"cross_attention_freq={self.cross_attention_freq}"
            )
        return self.num_layers // self.cross_attention_freq


class QFormerAttention(nn.Module):
    """BERT attention plus its output sub-layer: LayerNorm(x + dropout(dense(attn(x, context))))."""

    config: QFormerConfig
    is_cross_attention: bool
    deterministic: bool

    @nn.compact
    def __call__(self, x, context, context_mask):
        cfg = self.config
        kw = layers.dtypes(cfg)
        dense_kw = {**kw, "kernel_init": layers.normal(cfg.initializer_range)}
        heads = (cfg.num_heads, cfg.head_dim)
        # Cross-attention keys/values read the encoder width; name that axis apart so it can shard differently.
        context_axis = "encoder_embed" if self.is_cross_attention else "embed"
        q = layers.dense(heads, ("embed", "heads", "kv"), name="query", **dense_kw)(x)
        k = layers.dense(heads, (context_axis, "heads", "kv"), name="key", **dense_kw)(context)
        v = layers.dense(heads, (context_axis, "heads", "kv"), name="value", **dense_kw)(context)
        drop = nn.Dropout(cfg.attention_dropout, deterministic=self.deterministic)
        # passed only when it acts: the fused implementations cannot drop attention probabilities
        acting = cfg.attention_dropout > 0 and not self.deterministic
        out = layers.attention(q, k, v, key_mask=context_mask, dropout=drop if acting else None,
                               impl=cfg.attention_impl)
        out = layers.dense(cfg.hidden_size, ("heads", "kv", "embed"), name="output", num_in=2, **dense_kw)(out)
        out = nn.Dropout(cfg.hidden_dropout, deterministic=self.deterministic)(out)
        return layers.layer_norm(cfg.layer_norm_eps, name="output_layernorm", **kw)(out + x)


class QFormerLayer(nn.Module):
    config: QFormerConfig
    has_cross_attention: bool
    deterministic: bool

    @nn.compact
    def __call__(self, x, encoder_states, encoder_mask):
        cfg = self.config
        kw = layers.dtypes(cfg)
        dense_kw = {**kw, "kernel_init": layers.normal(cfg.initializer_range)}
        x = QFormerAttention(cfg, False, self.deterministic, name="attention")(x, x, None)
        if self.has_cross_attention:
            x = QFormerAttention(cfg, True, self.deterministic, name="crossattention")(
                x, encoder_states.astype(x.dtype), encoder_mask
            )
        h = layers.dense(cfg.intermediate_size, ("embed", "mlp"), name="intermediate_query", **dense_kw)(x)
        h = nn.gelu(h, approximate=False)
        h = layers.dense(cfg.hidden_size, ("mlp", "embed"), name="output_query", **dense_kw)(h)
        h = nn.Dropout(cfg.hidden_dropout, deterministic=self.deterministic)(h)
        return layers.layer_norm(cfg.layer_norm_eps, name="output_query_layernorm", **kw)(h + x)


class QFormerGroup(nn.Module):
    """`cross_attention_freq` consecutive layers, the first with cross-attention: the unit that repeats."""

    config: QFormerConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x, encoder_states, encoder_mask):
        for i in range(self.config.cross_attention_freq):
            x = QFormerLayer(self.config, i == 0, self.deterministic, name=f"layer_{i}")(
                x, encoder_states, encoder_mask
            )
        return nn.with_logical_constraint(x, layers.BATCH_LENGTH_EMBED), None


class QFormer(nn.Module):
    """query_embeds (B, Q, hidden), encoder_states (B, N, encoder_width) [, encoder_mask (B, N)] -> (B, Q, hidden).

    Parameters: `embeddings_layernorm`, then `groups_{g}/layer_{j}` (original layer g·freq + j), or with
    scan_layers one `groups` subtree whose leaves carry a leading `layers` axis of length num_groups.
    """

    config: QFormerConfig

    @nn.compact
    def __call__(self, query_embeds, encoder_states, encoder_mask=None, deterministic: bool = True):
        cfg = self.config
        kw = layers.dtypes(cfg)
        if encoder_states.shape[-1] != cfg.encoder_width:
            raise ValueError(
                f"Q-Former built for encoder width {cfg.encoder_width}, got encoder states {encoder_states.shape}"
            )
        x = layers.layer_norm(cfg.layer_norm_eps, name="embeddings_layernorm", **kw)(query_embeds)
        x = nn.Dropout(cfg.hidden_dropout, deterministic=deterministic)(x)
        if encoder_mask is None:
            encoder_mask = jnp.ones(encoder_states.shape[:2], dtype=bool)
        groups = layers.stack_layers(
            QFormerGroup,
            cfg.num_groups,
            scan=cfg.scan_layers,
            remat_policy=cfg.remat_policy,
            name="groups",
            num_broadcast_args=2,
            config=cfg,
            deterministic=deterministic,
        )
        return groups(x, encoder_states, encoder_mask)
