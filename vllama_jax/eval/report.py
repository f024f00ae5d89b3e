"""What a result carries besides its numbers: file digests, package versions, and the per-category bar chart."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path

PACKAGES = ("vllama_jax", "jax", "jaxlib", "flax", "numpy", "transformers", "tokenizers", "pycocoevalcap", "av")


def digest_files(*paths: str | Path | None) -> str | None:
    """sha256 over every file under `paths` (relative names and bytes, in name order): the same checkpoint
    gives the same digest wherever it is copied. None when no path is given."""
    files = []
    for root in filter(None, map(Path, filter(None, paths))):
        if root.is_file():
            files.append((root.name, root))
        elif root.is_dir():
            files += [(f"{root.name}/{p.relative_to(root)}", p) for p in sorted(root.rglob("*")) if p.is_file()]
    if not files:
        return None
    h = hashlib.sha256()
    for name, path in sorted(files):
        h.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def checkpoint_files(ckpt: str | None, frozen: str | None) -> list[Path]:
    """The files a session read its weights from: the run directory's newest checkpoint (or a trainable
    checkpoint directory as given) and the frozen checkpoint."""
    out = []
    if ckpt:
        ckpt = Path(ckpt)
        steps = [p for p in (ckpt / "checkpoints").glob("*") if p.name.isdigit()] if ckpt.is_dir() else []
        out.append(max(steps, key=lambda p: int(p.name)) if steps else ckpt)
    if frozen:
        out.append(Path(frozen))
    return out


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _finite(value):
    """NaN (a metric over no examples, e.g. no judge reply parsed) as null: metrics.json stays strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(_finite(value), indent=1, default=str, allow_nan=False) + "\n")


def plot_per_category(result: dict, path: Path, title: str) -> None:
    """A bar per category of the task's headline metric (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vllama_jax.eval.score import headline

    name, overall = headline(result)
    key = "exact_match" if name == "exact_match" else name
    per = result.get("per_category", {})
    labels = list(per)
    values = [per[c].get(key, float("nan")) for c in labels]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(labels) + 2), 3.2))
    ax.bar(range(len(labels)), values, color="#4c72b0")
    ax.axhline(overall, color="#c44e52", linestyle="--", label=f"all: {overall:.3f}")
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 4 else 0, ha="right")
    ax.set_ylabel(name)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
