"""Text generation for the LLaMA decoder and for Video-LLaMA: one prefill, then cached decoding in one jit.

The prompt (token embeddings with the soft tokens spliced in, left-padded to a common length) fills a static
KV cache of `prompt + max_new_tokens` slots in one forward pass; every further token costs one single-token
step inside a `lax.while_loop` that ends as soon as every row has stopped. Rotary positions count only a row's
real tokens, so a left-padded row decodes exactly as it would alone.

Token choice follows transformers' `generate` so that results can be compared with it (and with the original
demo, which calls it): the repetition penalty, then for sampling temperature → top-k → top-p, greedy argmax
otherwise; beam search is transformers' vectorised beam search (2 × beams candidates per step, a pool of
finished hypotheses scored by log-probability / length ** length_penalty, its early-stop heuristic).
A row stops at EOS, at any of `stop_sequences` (token-id sequences, e.g. LLaMA's two encodings of "###"), or
after `max_new_tokens`; the tokens after it are `pad_token_id`. With `max_length` set (the demo's 2000), a prompt
longer than max_length − max_new_tokens keeps only its last that many positions, as the demo cuts its prompt
embeddings (`Chat.answer`): a long conversation loses its beginning, soft tokens included.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vllama_jax.models.llama import LlamaForCausalLM, init_cache

NEG = -1.0e9  # transformers' "never pick this" score in beam search


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """What to generate. The defaults are greedy; `DEMO` holds the original demo's settings (SPEC §6)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; applies to the tokens generated so far
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search: hypothesis score = sum log-prob / length ** length_penalty
    min_new_tokens: int = 0  # EOS is forbidden before this many tokens
    eos_token_id: int = 2
    pad_token_id: int = 0
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    max_length: int | None = None  # prompt + new tokens at most: the prompt keeps its END (None = off)


# The original demo (conversation_video.py `Chat.answer`): sampling with top-p 0.9 at temperature 1, 300 tokens,
# the prompt cut to its last max_length − max_new_tokens positions.
DEMO = GenerationConfig(max_new_tokens=300, do_sample=True, temperature=1.0, top_p=0.9, repetition_penalty=1.0,
                        num_beams=1, length_penalty=1.0, min_new_tokens=1, max_length=2000)


def context_start(prompt_length: int, cfg: GenerationConfig) -> int:
    """The demo's `begin_idx`: how many leading prompt positions `max_length` drops (0 when it all fits)."""
    if cfg.max_length is None:
        return 0
    if cfg.max_length <= cfg.max_new_tokens:
        raise ValueError(f"max_length {cfg.max_length} leaves no room for a prompt before "
                         f"max_new_tokens {cfg.max_new_tokens} new tokens: raise max_length or lower max_new_tokens")
    return max(0, prompt_length + cfg.max_new_tokens - cfg.max_length)


def truncate_prompt(prompt_embeds, prompt_mask, cfg: GenerationConfig, prompt_ids=None):
    """(embeds, mask, ids) without the positions `context_start` drops. Static: it depends on shapes only. A
    left-padded batch keeps each row's last positions, as each row alone would."""
    begin = context_start(prompt_mask.shape[1], cfg)
    if not begin:
        return prompt_embeds, prompt_mask, prompt_ids
    return prompt_embeds[:, begin:], prompt_mask[:, begin:], None if prompt_ids is None else prompt_ids[:, begin:]


class Generated(NamedTuple):
    tokens: Any  # (B, max_new_tokens) int32, pad after each row's end
    lengths: Any  # (B,) tokens generated per row (the stop token included)
    scores: Any  # beam search: the chosen hypothesis' score (B,); otherwise None
    logits: Any  # (B, max_new_tokens, vocab) float32 raw logits of each step when asked for; otherwise None


def prompt_positions(padding_mask):
    """Rotary positions of a left-padded prompt: 0, 1, … over the real tokens (pads get 0, they are masked)."""
    return jnp.maximum(jnp.cumsum(padding_mask.astype(jnp.int32), axis=-1) - 1, 0)


def process_logits(logits, seen, step, cfg: GenerationConfig):
    """transformers' logits processors: repetition penalty on `seen` tokens, then no EOS before min_new_tokens."""
    logits = logits.astype(jnp.float32)
    if cfg.repetition_penalty != 1.0:
        penalised = jnp.where(logits < 0, logits * cfg.repetition_penalty, logits / cfg.repetition_penalty)
        logits = jnp.where(seen, penalised, logits)
    if cfg.min_new_tokens > 0:
        logits = jnp.where(
            (step < cfg.min_new_tokens) & (jnp.arange(logits.shape[-1]) == cfg.eos_token_id), -jnp.inf, logits
        )
    return logits


def warp_logits(logits, cfg: GenerationConfig):
    """transformers' sampling warpers in their order: temperature, top-k, top-p (at least one token survives)."""
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending, as transformers sorts
        cumulative = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
        remove_sorted = (cumulative <= 1.0 - cfg.top_p).at[..., -1].set(False)
        remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(remove, -jnp.inf, logits)
    return logits


def _hits_stop(tokens, step, last_token, cfg: GenerationConfig):
    """Did the row just end: EOS, or its generated tokens ending in one of the stop sequences."""
    hit = last_token == cfg.eos_token_id
    for seq in cfg.stop_sequences:
        n = len(seq)
        tail = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(step + 1 - n, 0), n, axis=-1)
        hit |= (step + 1 >= n) & jnp.all(tail == jnp.asarray(seq, tokens.dtype), axis=-1)
    return hit


def _llm_step(llm: LlamaForCausalLM, params, cache, embeds, mask, positions):
    logits, variables = llm.apply(
        {"params": params, "cache": cache},
        inputs_embeds=embeds,
        padding_mask=mask,
        positions=positions,
        decode=True,
        mutable=["cache"],
    )
    return logits[:, -1], variables["cache"]


def _embed(llm: LlamaForCausalLM, params, token_ids):
    return llm.apply({"params": params}, token_ids, method=LlamaForCausalLM.embed)


def _prompt_seen(prompt_ids, prompt_mask, vocab: int):
    """(B, vocab) True for the prompt's token ids: transformers' repetition penalty covers the prompt when it is
    given as ids. The original demo passes embeddings only, so there it covers the generated tokens alone."""
    if prompt_ids is None:
        return jnp.zeros((prompt_mask.shape[0], vocab), bool)
    hits = jax.nn.one_hot(jnp.where(prompt_mask, prompt_ids, -1), vocab, dtype=bool)  # -1 -> an all-False row
    return jnp.any(hits, axis=1)


def start(
    llm: LlamaForCausalLM,
    params,
    prompt_embeds,
    prompt_mask,
    cfg: GenerationConfig,
    rng=None,
    *,
    prompt_ids=None,
    return_logits: bool = False,
) -> dict:
    """Prefill: the decoding state after the prompt (cache filled, first token's logits ready)."""
    if cfg.do_sample and rng is None:
        raise ValueError("sampling (do_sample=True) needs an rng key")
    batch, prompt_len = prompt_mask.shape
    steps = cfg.max_new_tokens
    cache = init_cache(llm, params, batch, prompt_len + steps)
    positions = prompt_positions(prompt_mask)
    logits, cache = _llm_step(llm, params, cache, prompt_embeds, prompt_mask, positions)
    vocab = logits.shape[-1]
    return dict(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        logits=logits.astype(jnp.float32),
        tokens=jnp.full((batch, steps), cfg.pad_token_id, jnp.int32),
        done=jnp.zeros((batch,), bool),
        lengths=jnp.zeros((batch,), jnp.int32),
        seen=_prompt_seen(prompt_ids, prompt_mask, vocab),
        next_position=positions[:, -1] + 1,
        rng=jax.random.key(0) if rng is None else rng,
        all_logits=jnp.zeros((batch, steps, vocab) if return_logits else (0,), jnp.float32),
    )


def unfinished(state, cfg: GenerationConfig):
    return (state["step"] < cfg.max_new_tokens) & ~jnp.all(state["done"])


def advance(llm: LlamaForCausalLM, params, state: dict, cfg: GenerationConfig, *, return_logits: bool = False) -> dict:
    """Choose every row's next token, then feed it through the cached decoder (one token per row)."""
    step, batch = state["step"], state["done"].shape[0]
    vocab = state["logits"].shape[-1]
    scores = process_logits(state["logits"], state["seen"], step, cfg)
    rng, key = jax.random.split(state["rng"])
    if cfg.do_sample:
        token = jax.random.categorical(key, warp_logits(scores, cfg), axis=-1)
    else:
        token = jnp.argmax(scores, axis=-1)
    token = jnp.where(state["done"], cfg.pad_token_id, token).astype(jnp.int32)
    tokens = state["tokens"].at[:, step].set(token)
    all_logits = state["all_logits"].at[:, step].set(state["logits"]) if return_logits else state["all_logits"]
    logits, cache = _llm_step(
        llm,
        params,
        state["cache"],
        _embed(llm, params, token[:, None]),
        jnp.ones((batch, 1), bool),
        state["next_position"][:, None],
    )
    return dict(
        step=step + 1,
        cache=cache,
        logits=logits.astype(jnp.float32),
        tokens=tokens,
        done=state["done"] | _hits_stop(tokens, step, token, cfg),
        lengths=state["lengths"] + (~state["done"]).astype(jnp.int32),
        seen=state["seen"] | (jax.nn.one_hot(token, vocab, dtype=bool) & ~state["done"][:, None]),
        next_position=state["next_position"] + 1,
        rng=rng,
        all_logits=all_logits,
    )


def generate(
    llm: LlamaForCausalLM,
    params,
    prompt_embeds,
    prompt_mask,
    cfg: GenerationConfig,
    rng=None,
    *,
    prompt_ids=None,
    return_logits: bool = False,
) -> Generated:
    """Generate after left-padded prompt embeddings (B, P, hidden) with mask (B, P); jit it with `cfg` static.

    `params` are the LLM's (Video-LLaMA's `params["llama_model"]`). `rng` is needed only when sampling.
    `prompt_ids` (B, P), when given, count as seen for the repetition penalty (placeholders included).
    """
    prompt_embeds, prompt_mask, prompt_ids = truncate_prompt(prompt_embeds, prompt_mask, cfg, prompt_ids)
    if cfg.num_beams > 1:
        return beam_search(llm, params, prompt_embeds, prompt_mask, cfg, rng, prompt_ids=prompt_ids)
    state = start(llm, params, prompt_embeds, prompt_mask, cfg, rng, prompt_ids=prompt_ids, return_logits=return_logits)
    state = jax.lax.while_loop(
        lambda s: unfinished(s, cfg), lambda s: advance(llm, params, s, cfg, return_logits=return_logits), state
    )
    return Generated(state["tokens"], state["lengths"], None, state["all_logits"] if return_logits else None)


def make_stream(llm: LlamaForCausalLM, cfg: GenerationConfig):
    """stream(params, prompt_embeds, prompt_mask, rng=None): the same decoding one token at a time for a terminal,
    yielding each step's (B,) tokens as they come (pad for rows that have stopped). Prefill and step are jitted
    once here (each compiles once per shape); keep the function to reuse them. Sampling as `generate`; beam search
    does not stream (its best hypothesis is known only at the end)."""
    if cfg.num_beams > 1:
        raise ValueError("beam search cannot stream: use generate()")
    prefill = jax.jit(lambda params, embeds, mask, rng: start(llm, params, embeds, mask, cfg, rng))
    step = jax.jit(lambda params, state: advance(llm, params, state, cfg), donate_argnums=1)

    def run(params, prompt_embeds, prompt_mask, rng=None):
        prompt_embeds, prompt_mask, _ = truncate_prompt(prompt_embeds, prompt_mask, cfg)
        state = prefill(params, prompt_embeds, prompt_mask, rng)
        while bool(unfinished(state, cfg)):
            state = step(params, state)
            yield state["tokens"][:, int(state["step"]) - 1]

    return run


def stream(llm: LlamaForCausalLM, params, prompt_embeds, prompt_mask, cfg: GenerationConfig, rng=None):
    """`make_stream(llm, cfg)` run once (its jitted prefill and step are not kept)."""
    yield from make_stream(llm, cfg)(params, prompt_embeds, prompt_mask, rng)


def _reorder_cache(cache, rows, scanned: bool):
    """Gather the cache's batch rows (beam search keeps the rows of the surviving beams)."""
    axis = 1 if scanned else 0

    def gather(x):  # the write index (a scalar, or one per scanned layer) is shared by all rows
        return x if x.ndim <= axis else jnp.take(x, rows, axis=axis)

    return jax.tree_util.tree_map(gather, cache)


def beam_search(
    llm: LlamaForCausalLM, params, prompt_embeds, prompt_mask, cfg: GenerationConfig, rng=None, *, prompt_ids=None
) -> Generated:
    """transformers' vectorised beam search (early_stopping=False, one EOS id), on the cached decoder.

    Per step: log-softmax → processors → add each beam's running score → the best 2K of K × vocab candidates
    (sampled without replacement by the Gumbel top-k trick when do_sample) → the best K that did not stop keep
    running; the ones among the first K that stopped (EOS, stop sequence, or the last step) join the finished
    pool, scored by log-probability / (tokens so far) ** length_penalty. Returns the pool's best hypothesis.
    """
    beams, steps = cfg.num_beams, cfg.max_new_tokens
    batch, prompt_len = prompt_mask.shape
    keep = 2 * beams
    flat = batch * beams
    expand = lambda x: jnp.repeat(x, beams, axis=0)  # noqa: E731  row b*K + k is beam k of request b
    embeds, mask = expand(prompt_embeds), expand(prompt_mask)
    positions = prompt_positions(mask)
    cache = init_cache(llm, params, flat, prompt_len + steps)
    logits, cache = _llm_step(llm, params, cache, embeds, mask, positions)
    vocab = logits.shape[-1]
    rank_is_top = jnp.arange(keep) < beams
    state = dict(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        logits=logits.astype(jnp.float32),
        running=jnp.full((batch, beams, steps), cfg.pad_token_id, jnp.int32),
        running_scores=jnp.tile(jnp.where(jnp.arange(beams) == 0, 0.0, NEG), (batch, 1)),
        finished=jnp.full((batch, beams, steps), cfg.pad_token_id, jnp.int32),
        finished_scores=jnp.full((batch, beams), NEG),
        finished_lengths=jnp.zeros((batch, beams), jnp.int32),
        is_finished=jnp.zeros((batch, beams), bool),
        seen=expand(_prompt_seen(prompt_ids, prompt_mask, vocab)),
        improvable=jnp.ones((batch,), bool),
        all_stopped=jnp.zeros((), bool),
        next_position=positions[:, -1] + 1,
        rng=jax.random.key(0) if rng is None else rng,
    )

    def keep_going(s):
        return (s["step"] < steps) & jnp.any(s["improvable"]) & ~s["all_stopped"]

    def one_token(s):
        step = s["step"]
        log_probs = process_logits(jax.nn.log_softmax(s["logits"], axis=-1), s["seen"], step, cfg)
        if cfg.do_sample:
            log_probs = warp_logits(log_probs, cfg)
        total = (log_probs.reshape(batch, beams, vocab) + s["running_scores"][:, :, None]).reshape(batch, beams * vocab)
        rng, key = jax.random.split(s["rng"])
        if cfg.do_sample:  # multinomial without replacement over softmax(total) = top-k of total + Gumbel noise
            _, picked = jax.lax.top_k(total + jax.random.gumbel(key, total.shape), keep)
            top_scores = jnp.take_along_axis(total, picked, axis=-1)
            order = jnp.argsort(-top_scores, axis=-1)
            top_scores, picked = jnp.take_along_axis(top_scores, order, -1), jnp.take_along_axis(picked, order, -1)
        else:
            top_scores, picked = jax.lax.top_k(total, keep)
        origin, token = picked // vocab, (picked % vocab).astype(jnp.int32)
        candidates = jnp.take_along_axis(s["running"], origin[:, :, None], axis=1).at[:, :, step].set(token)
        stops = _hits_stop(candidates, step, token, cfg) | (step + 1 >= steps)

        # the best K candidates that did not stop keep running
        alive_scores = top_scores + NEG * stops
        _, survivors = jax.lax.top_k(alive_scores, beams)
        running = jnp.take_along_axis(candidates, survivors[:, :, None], axis=1)
        running_scores = jnp.take_along_axis(alive_scores, survivors, axis=1)
        rows = (jnp.arange(batch)[:, None] * beams + jnp.take_along_axis(origin, survivors, axis=1)).reshape(flat)

        # stopped candidates among the first K join the finished pool, length-normalised
        normalised = top_scores / ((step + 1).astype(jnp.float32) ** cfg.length_penalty)
        normalised = normalised + NEG * ~s["improvable"][:, None] + NEG * ~(stops & rank_is_top[None, :])
        pool_scores = jnp.concatenate([s["finished_scores"], normalised], axis=1)
        _, best = jax.lax.top_k(pool_scores, beams)
        pool = jnp.concatenate([s["finished"], candidates], axis=1)
        pool_lengths = jnp.concatenate([s["finished_lengths"], jnp.full((batch, keep), step + 1, jnp.int32)], axis=1)
        pool_finished = jnp.concatenate([s["is_finished"], stops & rank_is_top[None, :]], axis=1)
        finished = jnp.take_along_axis(pool, best[:, :, None], axis=1)
        finished_scores = jnp.take_along_axis(pool_scores, best, axis=1)
        finished_lengths = jnp.take_along_axis(pool_lengths, best, axis=1)
        is_finished = jnp.take_along_axis(pool_finished, best, axis=1)

        # transformers' heuristic (early_stopping=False): stop once no running beam can beat the worst finished one
        best_possible = running_scores[:, 0] / ((step + 1).astype(jnp.float32) ** cfg.length_penalty)
        worst_finished = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), NEG)
        improvable = s["improvable"] & jnp.any(best_possible[:, None] > worst_finished, axis=1)

        # the surviving beams' caches and seen tokens move to their new rows; then their new tokens go in
        new_tokens = running[:, :, step].reshape(flat)
        seen = s["seen"][rows] | jax.nn.one_hot(new_tokens, vocab, dtype=bool)
        cache = _reorder_cache(s["cache"], rows, llm.config.scan_layers)
        position = s["next_position"]  # the beams of one request share their positions
        logits, cache = _llm_step(
            llm, params, cache, _embed(llm, params, new_tokens[:, None]), jnp.ones((flat, 1), bool), position[:, None]
        )
        return dict(
            step=step + 1,
            cache=cache,
            logits=logits.astype(jnp.float32),
            running=running,
            running_scores=running_scores,
            finished=finished,
            finished_scores=finished_scores,
            finished_lengths=finished_lengths,
            is_finished=is_finished,
            seen=seen,
            improvable=improvable,
            all_stopped=jnp.all(stops),
            next_position=position + 1,
            rng=rng,
        )

    state = jax.lax.while_loop(keep_going, one_token, state)
    return Generated(state["finished"][:, 0], state["finished_lengths"][:, 0], state["finished_scores"][:, 0], None)


def video_llama_prompt(model, params, input_ids, padding_mask, frames=None, audio=None, audio_modality: str = "audio"):
    """Video-LLaMA's prompt embeddings: the media encoded by the frozen towers and glue, spliced at the
    placeholders of left-padded `input_ids`. Returns (embeddings, mask) ready for `generate`."""
    from vllama_jax.models.video_llama import VideoLlama

    soft = model.apply({"params": params}, frames, audio, audio_modality, method=VideoLlama.encode)
    embeds = model.apply({"params": params}, input_ids, soft.get("video"), soft.get("audio"), method=VideoLlama.splice)
    return embeds, padding_mask.astype(bool)
