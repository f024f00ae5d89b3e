"""`vllama-eval`: offline, deterministic evaluation of Video-LLaMA on released benchmark files (docs/eval.md).

readers.py reads each released format into `Example`s; prompts.py asks them; model_calls.py runs the model
(greedy generation, option log-likelihood); run.py is the resumable loop; metrics.py, caption_metrics.py and
bootstrap.py score; score.py scores a predictions file; judge.py is the local-judge protocol; report.py writes
metrics.json and metrics.png; main.py is the command line.
"""
