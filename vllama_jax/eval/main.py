"""`vllama-eval`: evaluate a model on a released benchmark file, or score a predictions file.

    vllama-eval run --config configs/tiny_shapes.py --ckpt runs/tiny --data mvbench/ --videos videos/ --out DIR
    vllama-eval score --task open_qa --predictions predictions.jsonl --out metrics.json

`run` loads the model as vllama-chat does, answers every example (greedy, fixed-shape batches; resumable), and
writes DIR/predictions.jsonl, DIR/metrics.json and DIR/metrics.png. `score` scores any predictions file with
the same metrics (fields in eval/score.py). `--judge DIR` adds the Video-ChatGPT judge protocol with a local
Hugging Face LLaMA-family model (open QA). docs/eval.md has one full command per task.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from vllama_jax.eval import bootstrap, prompts, readers, report, score
from vllama_jax.train import distributed

COMMANDS = ("run", "score")

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_shapes.py", "model / data / mesh config")
_CKPT = flags.DEFINE_string("ckpt", None, "a vllama-train run directory (or a trainable-parameter checkpoint)")
_TASK = flags.DEFINE_enum("task", None, readers.TASKS, "open_qa | multiple_choice | caption (run: checked "
                          "against --format's task)")
_DATA = flags.DEFINE_string("data", None, "run: the benchmark file or folder, as released")
_FORMAT = flags.DEFINE_enum("format", None, list(readers.READERS), "run: the file's format (default: from its name)")
_VIDEOS = flags.DEFINE_string("videos", None, "run: the folder of the videos (default: the data file's folder)")
_SPLIT = flags.DEFINE_string("split", None, "run: the split, recorded in metrics.json (MSR-VTT: also selects it)")
_OUT = flags.DEFINE_string("out", None, "run: the output directory; score: the metrics.json to write")
_PREDICTIONS = flags.DEFINE_string("predictions", None, "score: the predictions JSONL")
_TEMPLATE = flags.DEFINE_string("template", None, "vicuna | llama_2 | caption (default: the config's data.template)")
_MODE = flags.DEFINE_enum("mode", "generate", ["generate", "likelihood"],
                          "multiple choice: generate a letter, or pick the option of highest log-likelihood")
_BATCH = flags.DEFINE_integer("batch_size", 8, "examples per global batch (a multiple of the processes)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "tokens per answer at most (greedy)")
_PAD_TO = flags.DEFINE_integer("pad_to", 64, "prompts are padded to a multiple of this many tokens")
_TOKENIZER = flags.DEFINE_enum("caption_tokenizer", "auto", ["auto", "ptb", "python"],
                               "caption scores: PTBTokenizer (java) or the Python one; auto = ptb when java is there")
_METEOR = flags.DEFINE_bool("meteor", None, "caption scores: METEOR (java); default: when java is there")
_RESAMPLES = flags.DEFINE_integer("resamples", bootstrap.RESAMPLES, "bootstrap resamples for the 95 % intervals")
_SEED = flags.DEFINE_integer("seed", bootstrap.SEED, "bootstrap seed")
_JUDGE = flags.DEFINE_string("judge", None, "open QA: a local Hugging Face LLaMA-family directory to judge with")
_JUDGE_TOKENS = flags.DEFINE_integer("judge_max_new_tokens", 48, "judge reply length at most")
distributed.define_flags()


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def score_main() -> dict:
    if not (_TASK.value and _PREDICTIONS.value and _OUT.value):
        raise app.UsageError("score needs --task, --predictions and --out")
    _check_judge(_TASK.value)
    rows = score.read_predictions(_PREDICTIONS.value, _TASK.value)
    judge_info = None
    if _JUDGE.value:
        rows, judge_info = _judge(rows, Path(_OUT.value).with_name("judge.jsonl"))
    result = score.score_rows(_TASK.value, rows, _TOKENIZER.value, _METEOR.value, _RESAMPLES.value, _SEED.value)
    out = {"predictions": _PREDICTIONS.value, "predictions_digest": report.digest_files(_PREDICTIONS.value),
           "results": result, "judge": judge_info, "bootstrap": {"resamples": _RESAMPLES.value, "seed": _SEED.value},
           "versions": report.versions()}
    report.write_json(Path(_OUT.value), out)
    return result


def _check_judge(task: str) -> None:
    if _JUDGE.value and task != "open_qa":
        raise app.UsageError(f"--judge judges open-ended answers: this is a {task} task")


def _judge(rows: list[dict], path: Path) -> tuple[list[dict], dict]:
    from vllama_jax.eval import judge

    return judge.judge_rows(_JUDGE.value, rows, path, _JUDGE_TOKENS.value, log=_log)


def run_main() -> dict:
    from vllama_jax.eval.run import Evaluation, RunSettings
    from vllama_jax.infer.session import load_session

    if not (_DATA.value and _OUT.value):
        raise app.UsageError("run needs --data and --out")
    task, examples = readers.read_examples(_DATA.value, _FORMAT.value, _VIDEOS.value, _SPLIT.value)
    if _TASK.value and _TASK.value != task:
        raise app.UsageError(f"--task {_TASK.value}, but {_DATA.value} is a {task} benchmark")
    _check_judge(task)
    config = _CONFIG.value
    template = _TEMPLATE.value or config.data.get("template", "vicuna")
    out_dir = Path(_OUT.value)
    out_dir.mkdir(parents=True, exist_ok=True)
    session = load_session(config, _CKPT.value, log=_log)
    settings = RunSettings(task=task, template=template, likelihood=_MODE.value == "likelihood",
                           batch_size=_BATCH.value, max_new_tokens=_MAX_NEW.value, pad_to=_PAD_TO.value)
    evaluation = Evaluation(session, settings)
    started = time.perf_counter()
    summary = evaluation.run(examples, out_dir, log=_log)
    import jax

    if jax.process_index() != 0:
        return {}
    rows = summary.pop("rows")
    judge_info = None
    if _JUDGE.value:
        rows, judge_info = _judge(rows, out_dir / "judge.jsonl")
    result = score.score_rows(task, rows, _TOKENIZER.value, _METEOR.value, _RESAMPLES.value, _SEED.value)
    frozen = config.train.frozen_checkpoint or (str(Path(_CKPT.value) / "frozen") if _CKPT.value else None)
    metrics = {
        "task": task,
        "data": {"path": _DATA.value, "format": _FORMAT.value or readers.guess_format(Path(_DATA.value)),
                 "videos": _VIDEOS.value, "split": _SPLIT.value or "unspecified", "examples": len(examples),
                 "digest": report.digest_files(_DATA.value)},
        "model": {"config": config.get("name", ""), "ckpt": _CKPT.value, "frozen_checkpoint": frozen,
                  "checkpoint_digest": report.digest_files(*report.checkpoint_files(_CKPT.value, frozen))},
        "prompt": prompts.describe(task, template, settings.likelihood),
        "decoding": evaluation.decoding(),
        "results": result,
        "judge": judge_info,
        "bootstrap": {"resamples": _RESAMPLES.value, "seed": _SEED.value, "level": bootstrap.LEVEL},
        "run": {**summary, "total_seconds": round(time.perf_counter() - started, 2),
                "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind},
        "versions": report.versions(),
    }
    report.write_json(out_dir / "metrics.json", metrics)
    name, value = score.headline(result)
    report.plot_per_category(result, out_dir / "metrics.png", f"{task} · {Path(_DATA.value).name} · {name}")
    _log(f"{task}: {name} {value:.4f} over {len(rows)} examples "
         f"({result['missing_video']['count']} with a missing or unreadable video); wrote {out_dir}")
    return result


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: vllama-eval {{{' | '.join(COMMANDS)}}} --flags (got {' '.join(argv[1:])!r})")
    if argv[1] == "score":
        result = score_main()
    else:
        distributed.start_process()
        result = run_main()
    if result:
        name, value = score.headline(result)
        print(json.dumps({"task": result["task"], name: value}))


def cli():
    app.run(main)
