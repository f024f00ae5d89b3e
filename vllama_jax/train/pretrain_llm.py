"""Text-only training of a small LLaMA: the tiny default needs a language model that knows its caption
language before it is frozen (a real run loads a pretrained LLaMA instead; this is the one time an LLM trains).

Each document is a caption, half the time preceded by a short text context naming its attributes
("red circle rightwards"). From those it learns the captions' grammar and to copy what the context
names, which is what a pretrained LLM brings to Video-LLaMA: the video branch later learns to produce soft
tokens that play the context's part.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.data.text import clean_caption
from vllama_jax.models.llama import LlamaConfig, LlamaForCausalLM
from vllama_jax.models.video_llama import causal_lm_loss


def text_examples(
    tokenizer, documents: Sequence[tuple[str, str]], length: int, end_sym: str = "\n"
) -> dict[str, np.ndarray]:
    """(context, caption) pairs -> arrays (N, length): [BOS] + context tokens + caption tokens (+ end_sym),
    the caption tokenised exactly as `caption_example` does it; labels on the caption only."""
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    ids = np.full((len(documents), length), tokenizer.pad_token_id, np.int32)
    labels = np.full((len(documents), length), IGNORE_INDEX, np.int32)
    for row, (context, caption) in enumerate(documents):
        head = [tokenizer.bos_token_id] + encode(context)
        text = encode(clean_caption(caption) + end_sym)
        if len(head) + len(text) > length:
            raise ValueError(f"document {row} ({context!r}, {caption!r}) is longer than {length} tokens")
        ids[row, : len(head) + len(text)] = head + text
        labels[row, len(head) : len(head) + len(text)] = text
    return {"input_ids": ids, "padding_mask": ids != tokenizer.pad_token_id, "labels": labels}


def pretrain_llm(
    config: LlamaConfig,
    data: dict[str, np.ndarray],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    log: Callable[[str], None] = print,
) -> tuple[dict, list[float]]:
    """AdamW with a cosine schedule on `data` (from `text_examples`); returns (LlamaForCausalLM params, losses)."""
    model = LlamaForCausalLM(config)
    rng = np.random.default_rng(seed)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.asarray(data["input_ids"][:1]))["params"])
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 10), steps, learning_rate / 20)
    optimizer = optax.adamw(schedule, weight_decay=0.01)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            logits = model.apply({"params": p}, batch["input_ids"], padding_mask=batch["padding_mask"])
            return causal_lm_loss(logits, batch["labels"])[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for i in range(steps):
        rows = rng.integers(0, len(data["input_ids"]), batch_size)
        params, opt_state, loss = step(params, opt_state, {k: jnp.asarray(v[rows]) for k, v in data.items()})
        losses.append(float(loss))
        if i == 0 or (i + 1) % max(1, steps // 5) == 0:
            log(f"LLM text pretraining step {i + 1}/{steps}: loss {losses[-1]:.4f}")
    return params, losses
