"""The evaluation loop: examples in fixed-shape global batches, predictions appended as batches finish, a rerun
continuing where a killed one stopped.

Order and processes: the examples still to do are cut, in input order, into global batches of `batch_size`;
process p reads and feeds rows [p * b, (p + 1) * b) of each (b = batch_size / processes), so the global batch is
the input order again. Each batch's answers are gathered to every process and process 0 appends them to
`predictions.jsonl`; the last batch is filled up with repeats of its last example, computed and dropped. At the
end process 0 rewrites the file in input order (a run resumed after a change of --data order stays ordered) and
checks that every id is there exactly once.

Resuming: ids already in `predictions.jsonl` are skipped; a line cut short by the kill is dropped first.
An example whose video is missing or unreadable gets a line with `"error"` and `"pred": null`, is counted and
scored as wrong, never dropped.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from vllama_jax.eval import model_calls, prompts, score
from vllama_jax.eval.metrics import LETTERS
from vllama_jax.eval.readers import Example
from vllama_jax.infer import chat_prompt
from vllama_jax.infer.session import Session

ERROR_BYTES = 400  # an error message travels between processes in this many bytes


@dataclasses.dataclass(frozen=True)
class RunSettings:
    task: str
    template: str
    likelihood: bool = False  # multiple choice: the option with the highest log-likelihood, nothing generated
    batch_size: int = 8  # global: every process feeds batch_size / processes rows
    max_new_tokens: int = 32
    pad_to: int = 64  # prompts are left-padded to a multiple of this (one compile per bucket)


def prediction_id(task: str, row: dict) -> str:
    return str(row[score.ID_FIELD[task]])


def drop_cut_line(path: Path) -> bool:
    """Remove a last line that a kill cut short (the file does not end in a newline); whether there was one."""
    if not path.exists():
        return False
    text = path.read_text(encoding="utf-8")
    if not text or text.endswith("\n"):
        return False
    path.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    return True


def read_done(path: Path) -> list[dict]:
    """The rows of an earlier run (after `drop_cut_line`); a line that is not JSON is an error."""
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {n}: not JSON ({err.msg}); delete the line or the file to redo it") from err
    return rows


def _row(task: str, example: Example) -> dict:
    key = score.ID_FIELD[task]
    if task == "caption":
        return {key: example.id, "video": example.video, "references": list(example.references),
                "category": example.category}
    row = {key: example.id, "video": example.video, "question": example.question, "answer": example.answer,
           "category": example.category}
    if task == "multiple_choice":
        row = {**row, "candidates": list(example.candidates)}
    return row


def _encode_error(message: str) -> np.ndarray:
    raw = message.encode("utf-8")[:ERROR_BYTES]
    return np.frombuffer(raw.ljust(ERROR_BYTES, b"\0"), np.uint8)


def _decode_error(raw: np.ndarray) -> str:
    return bytes(np.asarray(raw, np.uint8)).rstrip(b"\0").decode("utf-8", errors="replace")


class Evaluation:
    """One evaluation: the session, the settings and the generation config they make."""

    def __init__(self, session: Session, settings: RunSettings):
        self.session, self.settings = session, settings
        processes = jax.process_count()
        ways = model_calls.batch_ways(session)
        if settings.batch_size % processes or settings.batch_size % ways:
            raise ValueError(f"--batch_size {settings.batch_size} must be a multiple of the {processes} processes and "
                             f"of the mesh's {ways} batch shards")
        if settings.likelihood and settings.task != "multiple_choice":
            raise ValueError("--mode=likelihood scores options: it needs a multiple-choice task")
        self.local_batch = settings.batch_size // processes
        self.end = session.config.data.end_sym if settings.template == "caption" else None
        self.cfg = session.generation_config(
            max_new_tokens=settings.max_new_tokens,
            stop_sequences=chat_prompt.stop_sequences(session, self.end, settings.template),
        )

    def decoding(self) -> dict:
        if self.settings.likelihood:
            return {"mode": "likelihood", "score": "sum of the option tokens' log-probabilities, highest wins"}
        cfg = dataclasses.asdict(self.cfg)
        return {"mode": "generate", "greedy": not cfg["do_sample"], **cfg}

    def answer_batch(self, filled: list[Example], examples: list[Example], num_options: int) -> list[tuple[str, str]]:
        """(error or "", answer) for every example of the global batch `filled`, on every process; this process
        reads and feeds `examples`, its rows of it. `num_options`: the most options any example has."""
        s, session = self.settings, self.session
        items, errors = [], []
        for ex in examples:
            try:
                items.append(model_calls.read_media(ex, session))
                errors.append("")
            except model_calls.MediaError as err:
                items.append(model_calls.blank_media(session))
                errors.append(str(err))
        prompts_ = [model_calls.prompt_ids(session, s.template, prompts.question_text(s.task, ex, s.likelihood),
                                           item) for ex, item in zip(examples, items)]
        gathered_errors = multihost_utils.process_allgather(np.stack([_encode_error(e) for e in errors]), tiled=True)
        if s.likelihood:
            tok = session.tokenizer
            options = [[tok(c, add_special_tokens=False)["input_ids"] for c in ex.candidates] for ex in examples]
            scores = model_calls.option_loglikelihoods(session, items, prompts_, options, num_options, s.pad_to)
            answers = [f"({LETTERS[k]}) {ex.candidates[k]}" for ex, k in zip(filled, np.argmax(scores, axis=1))]
        else:
            generated = model_calls.generate_answers(session, items, prompts_, self.cfg, s.template, self.end,
                                                     s.pad_to)
            answers = [text for text, _ in generated]
        return [(_decode_error(e), a) for e, a in zip(gathered_errors, answers)]

    def run(self, examples: list[Example], out_dir: Path, log=print) -> dict:
        """Answer every example not yet in out_dir/predictions.jsonl; returns counts and timings."""
        from tqdm import tqdm

        s = self.settings
        num_options = max(len(ex.candidates) for ex in examples)
        path = Path(out_dir) / "predictions.jsonl"
        processes, me = jax.process_count(), jax.process_index()
        if me == 0 and drop_cut_line(path):
            log(f"{path}: dropped the last line, cut short by the interruption (that example is redone)")
        multihost_utils.sync_global_devices("vllama-eval: predictions file repaired")
        done_rows = read_done(path)
        known = {ex.id for ex in examples}
        stray = [prediction_id(s.task, r) for r in done_rows if prediction_id(s.task, r) not in known]
        if stray:
            raise ValueError(f"{path} holds ids that are not in --data (first: {stray[0]!r}): another "
                             "evaluation's output directory?")
        done = {prediction_id(s.task, r) for r in done_rows}
        todo = [ex for ex in examples if ex.id not in done]
        if done:
            log(f"resuming: {len(done)} of {len(examples)} examples already in {path}")
        started, answered = time.perf_counter(), 0
        running = list(done_rows)
        bar = tqdm(total=len(examples), initial=len(done), unit="ex", desc=f"{s.task}", file=sys.stderr,
                   disable=me != 0)
        for begin in range(0, len(todo), s.batch_size):
            batch = todo[begin:begin + s.batch_size]
            filled = batch + [batch[-1]] * (s.batch_size - len(batch))
            mine = filled[me * self.local_batch:(me + 1) * self.local_batch]
            results = self.answer_batch(filled, mine, num_options)
            new_rows = []
            for ex, (error, answer) in zip(batch, results):
                row = _row(s.task, ex)
                if error:
                    row.update(pred=None, error=error)
                else:
                    row["pred"] = answer
                new_rows.append(row)
            if me == 0:
                with open(path, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in new_rows))
            answered += len(batch)
            running += new_rows
            bar.update(len(batch))
            if s.task != "caption":
                name, value = score.headline(score.score_rows(s.task, running, resamples=1))
                bar.set_postfix({name: f"{value:.3f}", "missing": sum(bool(r.get("error")) for r in running)})
        bar.close()
        multihost_utils.sync_global_devices("vllama-eval: predictions written")
        rows = ordered_rows(path, s.task, examples) if me == 0 else []
        seconds = time.perf_counter() - started
        return {"answered_now": answered, "resumed_from": len(done), "seconds": round(seconds, 2),
                "examples_per_second": round(answered / seconds, 3) if answered else None,
                "processes": processes, "rows": rows}


def ordered_rows(path: Path, task: str, examples: list[Example]) -> list[dict]:
    """Rewrite predictions.jsonl in input order, checking each example is there exactly once."""
    rows = read_done(path)
    by_id = {}
    for r in rows:
        key = prediction_id(task, r)
        if key in by_id:
            raise ValueError(f"{path}: {key!r} appears twice")
        by_id[key] = r
    missing = [ex.id for ex in examples if ex.id not in by_id]
    if missing or len(by_id) != len(examples):
        raise ValueError(f"{path}: {len(missing)} examples have no prediction (first: {missing[:1]})")
    ordered = [by_id[ex.id] for ex in examples]
    if ordered != rows:
        path.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    return ordered
