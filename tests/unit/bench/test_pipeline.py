"""`python -m vllama_jax.bench.pipeline`: both arms run and seeking beats decoding every frame."""




def test_bench_runs_and_seeking_wins(tmp_path):
    from vllama_jax.bench import pipeline as bench

    result = bench.run(num_clips=1, seconds=10.0, repeats=1, workdir=tmp_path)
    assert result["clips"] == 1 and result["ratio"] > 1.0
