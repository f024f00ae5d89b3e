"""`python -m vllama_jax.bench.decode --quick`: the same tokens as transformers' generate, then the ratios."""




def test_benchmark_quick_mode_checks_tokens_and_reports_ratios(capsys):
    import math

    from vllama_jax.bench import decode as benchmark

    results = benchmark.run(quick=True)
    assert [(r["batch"], r["prompt"], r["new_tokens"]) for r in results] == [(1, 16, 16), (4, 16, 16)]
    for r in results:
        assert r["same_tokens"]  # greedy tokens equal transformers' generate
        figures = [
            *r["prefill_ms"].values(),
            *r["decode_tokens_per_s"].values(),
            r["prefill_speedup"],
            r["decode_speedup"],
        ]
        assert all(math.isfinite(x) and x > 0 for x in figures), r
    assert capsys.readouterr().out.count("| tiny |") == 2
