"""Decoding speed against transformers' PyTorch `generate`, same weights, same machine, same run.

    python -m vllama_jax.bench.decode            # tiny and small LLaMA configs, batch 1 and 8
    python -m vllama_jax.bench.decode --quick    # tiny only, fewer tokens (what the test runs)
    python -m vllama_jax.bench.decode --scan --json=decode.json   # scanned layers, the results as JSON

For each config: random LLaMA weights made in PyTorch and converted to ours; greedy decoding of `new_tokens`
tokens after a `prompt`-token prompt with EOS switched off, so both generate exactly the same count; the
token ids are compared first (the benchmark fails when they differ). Reported: prefill time (one forward
over the prompt, filling the cache) and decode tokens/s (generated tokens / time after prefill), each the
median of `repeats` timed runs after a warm-up (ours: compiled once beforehand), and the ratios ours / theirs.
Timings on a shared machine are noisy: read the ratios, not the absolute numbers.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vllama_jax.infer.generate import GenerationConfig, advance, start, unfinished
from vllama_jax.models.llama import SIZES, LlamaConfig, LlamaForCausalLM

CONFIGS = {
    "tiny": SIZES["tiny"],
    # ~110 M parameters: LLaMA's vocabulary, a BERT-base-sized body
    "small": LlamaConfig(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=12,
                         vocab_size=32000),
}


def torch_llama(cfg: LlamaConfig, seed: int = 0):
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM as HFLlama

    torch.manual_seed(seed)
    hf = HFLlama(
        HFConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            rms_norm_eps=cfg.rms_norm_eps,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
    )
    with torch.no_grad():  # wider than HF's 0.02 init, so greedy choices are clear-cut, not near-ties
        for name, weight in hf.named_parameters():
            if not name.endswith("norm.weight"):
                weight.normal_(0.0, 0.05)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def converted_params(hf, cfg: LlamaConfig):
    """The PyTorch weights as our parameter tree, through the checkpoint converter's Llama table."""
    from vllama_jax.convert import llama as llama_map
    from vllama_jax.convert.mapping import prefixed
    from vllama_jax.convert.video_llama import load_state_dict

    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    abstract = jax.eval_shape(
        lambda: LlamaForCausalLM(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    )
    scanned = [("decoder/layers", cfg.num_layers)] if cfg.scan_layers else []
    params = load_state_dict(
        state, prefixed(llama_map.llama_rules(cfg), "", ""), abstract, scanned, source_name="benchmark"
    )
    return jax.tree_util.tree_map(jnp.asarray, params)


def _median_seconds(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(name: str, batch: int, prompt: int, new_tokens: int, repeats: int, scan: bool = False) -> dict:
    import torch

    cfg = dataclasses.replace(CONFIGS[name], scan_layers=scan)
    hf = torch_llama(cfg)
    params = converted_params(hf, cfg)
    model = LlamaForCausalLM(cfg)
    ids = np.random.default_rng(1).integers(3, cfg.vocab_size, (batch, prompt)).astype(np.int32)
    mask = jnp.ones((batch, prompt), bool)
    gen = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=-1)  # EOS off: every run makes new_tokens

    embed = jax.jit(lambda p, i: model.apply({"params": p}, i, method=LlamaForCausalLM.embed))
    prefill = jax.jit(lambda p, e, m: start(model, p, e, m, gen))
    decode = jax.jit(
        lambda p, s: jax.lax.while_loop(lambda x: unfinished(x, gen), lambda x: advance(model, p, x, gen), s)
    )

    def ours_prefill():
        return jax.block_until_ready(prefill(params, embed(params, ids), mask))

    def ours_all():
        return jax.block_until_ready(decode(params, ours_prefill()))["tokens"]

    ours_all()  # compile
    ours_prefill_s, _ = _median_seconds(ours_prefill, repeats)
    ours_total_s, tokens = _median_seconds(ours_all, repeats)

    torch_ids = torch.from_numpy(ids).long()

    def theirs_prefill():
        with torch.no_grad():
            return hf(input_ids=torch_ids, use_cache=True)

    def theirs_all():
        with torch.no_grad():
            return hf.generate(
                input_ids=torch_ids,
                attention_mask=torch.ones_like(torch_ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
            )

    theirs_all()  # warm-up
    theirs_prefill_s, _ = _median_seconds(theirs_prefill, repeats)
    theirs_total_s, expected = _median_seconds(theirs_all, repeats)
    same = np.array_equal(np.asarray(tokens), expected[:, prompt:].numpy())
    decoded = batch * new_tokens
    ours_rate = decoded / max(ours_total_s - ours_prefill_s, 1e-9)
    theirs_rate = decoded / max(theirs_total_s - theirs_prefill_s, 1e-9)
    return {
        "config": name,
        "parameters": int(sum(p.numel() for p in hf.parameters())),
        "batch": batch,
        "prompt": prompt,
        "new_tokens": new_tokens,
        "same_tokens": bool(same),
        "prefill_ms": {"ours": round(ours_prefill_s * 1e3, 2), "transformers": round(theirs_prefill_s * 1e3, 2)},
        "decode_tokens_per_s": {"ours": round(ours_rate, 1), "transformers": round(theirs_rate, 1)},
        "prefill_speedup": round(theirs_prefill_s / ours_prefill_s, 2),
        "decode_speedup": round(ours_rate / theirs_rate, 2),
    }


def run(quick: bool = False, scan: bool = False, json_path: str | None = None) -> list[dict]:
    """Measure the runs (`--quick`: the tiny config at batch 1 and 4, 16 tokens), print the table, return the rows;
    fails when our greedy tokens differ from transformers'."""
    import torch
    import transformers

    if quick:
        runs = [("tiny", 1, 16, 16, 2), ("tiny", 4, 16, 16, 2)]
    else:
        runs = [(n, b, 128, 64, 3) for n in ("tiny", "small") for b in (1, 8)]
    print(
        f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s); jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}; our layers {'scanned' if scan else 'per layer'}"
    )
    print(
        "| config | params | batch | prompt | new | same tokens | prefill ms ours / theirs "
        "| decode tok/s ours / theirs | prefill × | decode × |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for name, batch, prompt, new_tokens, repeats in runs:
        r = measure(name, batch, prompt, new_tokens, repeats, scan)
        results.append(r)
        print(
            f"| {name} | {r['parameters']:,} | {batch} | {prompt} | {new_tokens} | {r['same_tokens']} | "
            f"{r['prefill_ms']['ours']} / {r['prefill_ms']['transformers']} | "
            f"{r['decode_tokens_per_s']['ours']} / {r['decode_tokens_per_s']['transformers']} | "
            f"{r['prefill_speedup']} | {r['decode_speedup']} |",
            flush=True,
        )
        if not r["same_tokens"]:
            raise SystemExit(f"{name} batch {batch}: greedy tokens differ from transformers' generate")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return results


def main(argv) -> None:
    from absl import flags

    del argv
    run(flags.FLAGS.quick, flags.FLAGS.scan, flags.FLAGS.json)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_bool("quick", False, "tiny config only, 16 tokens, 2 repeats")
    flags.DEFINE_bool(
        "scan",
        False,
        "decode with scanned layers (the training layout; slower: its KV cache moves "
        "through the scan every token) instead of per-layer ones (what vllama-chat uses)",
    )
    flags.DEFINE_string("json", None, "also write the results here")
    app.run(main)
