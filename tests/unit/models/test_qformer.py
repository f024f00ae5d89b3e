"""The BLIP-2 Q-Former's query path (`models/qformer.py`): parity with transformers' Blip2QFormerModel (cross-attention
every 1 or 2 layers, encoder widths 48 / 40 / 1024, scanned or not, with and without an encoder mask); the
audio-width Q-Former's size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vllama_jax.convert import qformer as qformer_map
from vllama_jax.models.qformer import QFormer, QFormerConfig
from vllama_jax.models.video_llama import count_params
from vllama_jax.testing import torch_reference as ref
from vllama_jax.testing.torch_reference import load, report


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
    params = load(
        QFormer(cfg), (query, encoder), ref.qformer_state_dict(torch_model), qformer_map.qformer_rules(cfg), scanned
    )
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


def test_audio_width_qformer_count():
    cfg = QFormerConfig(num_layers=2, encoder_width=1024, cross_attention_freq=1)
    q = jax.ShapeDtypeStruct((1, 8, 768), jnp.float32)
    enc = jax.ShapeDtypeStruct((1, 8, 1024), jnp.float32)
    params = jax.eval_shape(lambda a, b: QFormer(cfg).init(jax.random.key(0), a, b)["params"], q, enc)
    assert count_params(params) == 19_691_520
