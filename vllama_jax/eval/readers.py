"""The benchmark files as released, read into `Example`s (formats and sources: docs/eval.md).

Formats (`--format`; the task follows from it):
- `video_chatgpt` (open_qa): `test_q.json` [{video_name, question_id, question}] and, beside it, the
  index-aligned `test_a.json` [{answer, type, question_id}]; `--data` names test_q.json or their folder.
- `jsonl` (open_qa): one {id, video, question, answer} (optional `category`) a line.
- `mvbench` (multiple_choice): one task's JSON [{video, question, candidates, answer, start?, end?}] or a folder.
- `videomme` (multiple_choice): Video-MME's parquet (videoID, duration, question_id, question, options, answer).
- `msrvtt` (caption): MSR-VTT's `*_videodatainfo.json` ({videos, sentences}) or a COCO-style {id: [captions]}.
- `webvid` (caption): a WebVid CSV (videoid, name, page_dir), one reference a clip: the CPU demo's held-out set.

Videos are looked up under `videos` (default: the data file's folder), with the extensions the original scripts
try. A video that is not there still makes an Example: the run reports and counts it. Malformed entries raise
`FormatError` naming the file and the line or entry; an answer file whose ids do not match its questions is
refused.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

TASKS = ("open_qa", "multiple_choice", "caption")
VIDEO_EXTENSIONS = ("", ".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")


class FormatError(ValueError):
    """A benchmark file that does not have the expected layout; the message names the file and the entry."""


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    video: str  # the media file (it may not exist: the run reports it)
    question: str = ""
    answer: str = ""  # open QA: the answer; multiple choice: the right option's text
    candidates: tuple[str, ...] = ()
    references: tuple[str, ...] = ()  # captioning
    category: str = ""  # question type, MVBench task, Video-MME duration (per-category metrics)
    start: float | None = None  # seconds: only this window of the video (MVBench's STAR / TVQA / ...)
    end: float | None = None


def find_video(folder: Path, name: str) -> str:
    """`folder/name` with the first extension that exists, else `folder/name` + the first extension tried."""
    for ext in VIDEO_EXTENSIONS:
        path = folder / f"{name}{ext}"
        if path.is_file():
            return str(path)
    return str(folder / (name if Path(name).suffix else f"{name}.mp4"))


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FormatError(f"{path}: not JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err


def _need(entry, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: expected an object with {', '.join(keys)}, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise FormatError(f"{where}: missing {', '.join(missing)} (has {', '.join(sorted(entry))})")


def read_video_chatgpt(data: Path, videos: Path | None = None) -> list[Example]:
    """Video-ChatGPT's test_q.json + test_a.json (Video-LLaVA's run_inference_video_qa.py reads them index by
    index): the i-th answer must carry the i-th question's question_id."""
    q_path = data / "test_q.json" if data.is_dir() else data
    a_path = q_path.with_name("test_a.json") if q_path.name == "test_q.json" else q_path.parent / "test_a.json"
    if not a_path.exists():
        raise FileNotFoundError(f"{a_path}: the answers file next to {q_path} is missing")
    questions, answers = _load_json(q_path), _load_json(a_path)
    for path, rows in ((q_path, questions), (a_path, answers)):
        if not isinstance(rows, list):
            raise FormatError(f"{path}: expected a JSON list, got {type(rows).__name__}")
    if len(questions) != len(answers):
        raise FormatError(f"{a_path} has {len(answers)} answers for the {len(questions)} questions of {q_path}: "
                          "the two files must be index-aligned")
    folder = videos or q_path.parent
    out, seen = [], set()
    for i, (q, a) in enumerate(zip(questions, answers)):
        _need(q, ("video_name", "question_id", "question"), f"{q_path} entry {i}")
        _need(a, ("answer", "question_id"), f"{a_path} entry {i}")
        if str(q["question_id"]) != str(a["question_id"]):
            raise FormatError(f"{a_path} entry {i} answers question_id {a['question_id']!r}, but entry {i} of "
                              f"{q_path} is question_id {q['question_id']!r}: the answer ids do not match the "
                              "questions")
        qid = str(q["question_id"])
        if qid in seen:
            raise FormatError(f"{q_path} entry {i}: question_id {qid!r} appears twice")
        seen.add(qid)
        out.append(Example(qid, find_video(folder, str(q["video_name"])), str(q["question"]), str(a["answer"]),
                           category=str(a.get("type", ""))))
    return out


def read_jsonl(data: Path, videos: Path | None = None) -> list[Example]:
    """A plain JSONL of {id, video, question, answer} (optional category)."""
    folder, out, seen = videos or data.parent, [], set()
    for n, line in enumerate(data.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{data} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise FormatError(f"{where}: not JSON ({err.msg} at column {err.colno})") from err
        _need(row, ("id", "video", "question", "answer"), where)
        if str(row["id"]) in seen:
            raise FormatError(f"{where}: id {row['id']!r} appears twice")
        seen.add(str(row["id"]))
        out.append(Example(str(row["id"]), find_video(folder, str(row["video"])), str(row["question"]),
                           str(row["answer"]), category=str(row.get("category", ""))))
    return out


def read_mvbench(data: Path, videos: Path | None = None) -> list[Example]:
    """MVBench: one JSON list per task (the file name is the task); the answer is one candidate's text."""
    files = sorted(data.glob("*.json")) if data.is_dir() else [data]
    if not files:
        raise FileNotFoundError(f"{data}: no MVBench task files (*.json)")
    out = []
    for path in files:
        task, rows = path.stem, _load_json(path)
        if not isinstance(rows, list):
            raise FormatError(f"{path}: expected a JSON list of questions, got {type(rows).__name__}")
        folder = videos or path.parent
        for i, row in enumerate(rows):
            where = f"{path} entry {i}"
            _need(row, ("video", "question", "candidates", "answer"), where)
            candidates = tuple(str(c) for c in row["candidates"])
            if str(row["answer"]) not in candidates:
                raise FormatError(f"{where}: the answer {row['answer']!r} is not one of the candidates {candidates}")
            window = [row.get("start"), row.get("end")]
            out.append(Example(f"{task}/{i}", find_video(folder, str(row["video"])), str(row["question"]),
                               str(row["answer"]), candidates, category=task,
                               start=None if window[0] is None else float(window[0]),
                               end=None if window[1] is None else float(window[1])))
    return out


def _option_parts(option: str, letter: str, where: str) -> str:
    """Video-MME's "A. text" -> "text"."""
    text = str(option).strip()
    for sep in (".", ")", ":"):
        if text.startswith(letter + sep):
            return text[2:].strip()
    raise FormatError(f"{where}: option {option!r} does not start with {letter}.")


def read_videomme(data: Path, videos: Path | None = None) -> list[Example]:
    """Video-MME's parquet: options "A. …" to "D. …", the answer a letter; the category is the duration."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(data)
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise FormatError(f"{data}: not a readable parquet file ({err})") from err
    rows = table.to_pylist()
    folder, out = videos or data.parent, []
    for i, row in enumerate(rows):
        where = f"{data} row {i}"
        _need(row, ("videoID", "question_id", "question", "options", "answer"), where)
        letters = [chr(ord("A") + k) for k in range(len(row["options"]))]
        candidates = tuple(_option_parts(o, letter, where) for o, letter in zip(row["options"], letters))
        if row["answer"] not in letters:
            raise FormatError(f"{where}: answer {row['answer']!r} is not one of the option letters {letters}")
        out.append(Example(str(row["question_id"]), find_video(folder, str(row["videoID"])), str(row["question"]),
                           candidates[letters.index(row["answer"])], candidates,
                           category=str(row.get("duration", ""))))
    return out


def read_msrvtt(data: Path, videos: Path | None = None, split: str | None = None) -> list[Example]:
    """MSR-VTT's videodatainfo JSON ({videos: [{video_id, split}], sentences: [{video_id, caption}]}), its
    `split` only when given; or a COCO-style {id: [{"caption": …} or "…"]} dict."""
    raw, folder = _load_json(data), videos or data.parent
    refs: dict[str, list[str]] = {}
    if isinstance(raw, dict) and "sentences" in raw:
        keep = None
        if split:
            _need(raw, ("videos",), str(data))
            keep = {v["video_id"] for v in raw["videos"] if v.get("split") == split}
            if not keep:
                raise FormatError(f"{data}: no videos of split {split!r}")
        for i, s in enumerate(raw["sentences"]):
            _need(s, ("video_id", "caption"), f"{data} sentences[{i}]")
            if keep is None or s["video_id"] in keep:
                refs.setdefault(str(s["video_id"]), []).append(str(s["caption"]))
    elif isinstance(raw, dict):
        for key, captions in raw.items():
            if not isinstance(captions, list):
                raise FormatError(f"{data} [{key!r}]: expected a list of captions")
            refs[str(key)] = [str(c["caption"]) if isinstance(c, dict) else str(c) for c in captions]
    else:
        raise FormatError(f"{data}: expected MSR-VTT's {{videos, sentences}} or a {{id: [captions]}} dict")
    return [Example(k, find_video(folder, k), references=tuple(v)) for k, v in refs.items()]


def read_webvid(data: Path, videos: Path | None = None) -> list[Example]:
    """A WebVid CSV (videoid, name, page_dir): the clip is `videos/page_dir/videoid`, its one reference `name`."""
    folder, out = videos or data.parent, []
    with open(data, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"videoid", "name"} - set(reader.fieldnames or ())
        if missing:
            raise FormatError(f"{data} line 1: the header lacks {', '.join(sorted(missing))}")
        for row in reader:
            if not row.get("videoid") or row.get("name") is None:
                raise FormatError(f"{data} line {reader.line_num}: an empty videoid or name")
            page = row.get("page_dir") or "."
            out.append(Example(row["videoid"], find_video(folder / page, row["videoid"]), references=(row["name"],)))
    return out


READERS = {
    "video_chatgpt": ("open_qa", read_video_chatgpt),
    "jsonl": ("open_qa", read_jsonl),
    "mvbench": ("multiple_choice", read_mvbench),
    "videomme": ("multiple_choice", read_videomme),
    "msrvtt": ("caption", read_msrvtt),
    "webvid": ("caption", read_webvid),
}


def guess_format(data: Path) -> str:
    if data.is_dir():
        return "video_chatgpt" if (data / "test_q.json").exists() else "mvbench"
    by_suffix = {".jsonl": "jsonl", ".parquet": "videomme", ".csv": "webvid"}
    if data.suffix in by_suffix:
        return by_suffix[data.suffix]
    if data.name == "test_q.json":
        return "video_chatgpt"
    raise ValueError(f"{data}: cannot tell the format from the name; pass --format ({', '.join(READERS)})")


def read_examples(data: str | Path, fmt: str | None = None, videos: str | Path | None = None,
                  split: str | None = None) -> tuple[str, list[Example]]:
    """(task, examples) of one benchmark file (or folder) in a released format."""
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"--data {data} does not exist")
    fmt = fmt or guess_format(data)
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(READERS)}")
    task, reader = READERS[fmt]
    folder = Path(videos) if videos else None
    examples = reader(data, folder, split) if fmt == "msrvtt" else reader(data, folder)
    if not examples:
        raise FormatError(f"{data}: no examples")
    return task, examples
