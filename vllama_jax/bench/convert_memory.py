"""Peak memory of `vllama-convert import` on a synthetic sharded Llama checkpoint, against its largest shard.

    python -m vllama_jax.bench.convert_memory --gigabytes 2.1 --shard_megabytes 500 --workdir /tmp/memcheck

Writes a Hugging Face Llama folder (float16 safetensors shards with an index; LLaMA-shaped, sized to
`--gigabytes`), imports it with the CLI in a child process (the LLM only, scanned layers, so the largest output
array is one stacked weight), and prints the child's peak RSS, the same CLI's RSS after its imports alone
(`--dry_run`: it plans everything but reads no array), the largest shard and the largest output array. Checks a
few converted tensors against the source. `measure` is the same without the command line.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from safetensors.numpy import save_file

from vllama_jax.convert.llama import llama_rules
from vllama_jax.convert.mapping import torch_shape
from vllama_jax.convert.video_llama import unscanned_shapes
from vllama_jax.models.llama import LlamaConfig, LlamaForCausalLM

CONFIG = '''
import importlib.util
_spec = importlib.util.spec_from_file_location("_base", {base!r})
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg=""):
    config = _base.get_config("tiny")
    config.model.llm.update({llm})
    return config
'''


def llama_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face Llama state-dict shapes for `config`, from the conversion rules and our parameter shapes."""
    config = dataclasses.replace(config, scan_layers=False)
    ids = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(lambda: LlamaForCausalLM(config).init(jax.random.PRNGKey(0), ids)["params"])
    ours = unscanned_shapes(abstract, [])
    return {rule.source: torch_shape(rule.transform, ours[rule.target]) for rule in llama_rules(config)}


def _bytes(shapes: dict) -> int:
    return sum(int(np.prod(shape)) * 2 for shape in shapes.values())  # float16


def tensor_values(key: str, shape) -> np.ndarray:
    """Cheap, key-dependent float16 values (every tensor differs, so a mix-up shows)."""
    seed = sum(key.encode()) % 997
    values = (np.arange(int(np.prod(shape)), dtype=np.int64) * 7 + seed) % 2003 - 1001
    return values.astype(np.float16).reshape(shape) / 1024


def write_llama(folder: Path, shapes: dict, shard_bytes: int, llm: dict) -> list[int]:
    folder.mkdir(parents=True)
    shards, current, size = [], [], 0
    for key, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    shards.append(current)
    weight_map, sizes = {}, []
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensor_values(k, shapes[k]) for k in keys}, str(folder / name))
        weight_map.update({k: name for k in keys})
        sizes.append((folder / name).stat().st_size)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **llm}))
    return sizes


def child_peak_rss(command: list[str]) -> tuple[int, subprocess.CompletedProcess]:
    """Run `command` in a fresh process (through a tiny wrapper) and return its own peak RSS in bytes."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    result = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True)
    peak = int(result.stdout.strip().splitlines()[-1].split()[1]) * 1024
    return peak, result


def measure(gigabytes: float, shard_megabytes: float, workdir: str | Path) -> dict:
    """Write the synthetic checkpoint under `workdir`, import it in a child process, and return (and print) the
    report: shard and output-array sizes, the child's peak RSS and a dry run's, and whether the values match."""
    workdir = Path(workdir)
    hidden, mlp, vocab = 2048, 5632, 32000
    llm = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_heads=16, num_kv_heads=16,
               scan_layers=True, dtype="float32", param_dtype="float16")
    one, two = (_bytes(llama_shapes(LlamaConfig(**llm, num_layers=n))) for n in (1, 2))
    layers = max(1, round((gigabytes * 2**30 - (2 * one - two)) / (two - one)))
    llm["num_layers"] = layers
    shapes = llama_shapes(LlamaConfig(**llm))
    sizes = write_llama(workdir / "llama", shapes, int(shard_megabytes * 2**20), dict(llm))
    config = workdir / "config.py"
    repo_config = Path(__file__).resolve().parents[2] / "configs" / "video_llama.py"
    config.write_text(CONFIG.format(base=str(repo_config), llm=repr(llm)))

    command = ["vllama-convert", "import", f"--config={config}:x", "--part=llama_model",
               f"--source={workdir / 'llama'}", f"--out={workdir / 'orbax'}"]
    baseline, _ = child_peak_rss([*command, "--dry_run"])  # everything but reading and writing the arrays
    peak, result = child_peak_rss(command)
    if result.returncode != 0:
        raise SystemExit(f"import failed:\n{result.stderr[-3000:]}")
    largest_output = max(layers * mlp * hidden, vocab * hidden) * 2
    # spot-check: a stacked weight's last layer and the embedding, against the source values
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore((workdir / "orbax").absolute())
    llama = params["llama_model"]
    ok = np.array_equal(np.asarray(llama["decoder"]["layers"]["down_proj"]["kernel"][-1]),
                        tensor_values(f"model.layers.{layers - 1}.mlp.down_proj.weight", (hidden, mlp)).T)
    ok &= np.array_equal(np.asarray(llama["embed_tokens"]["embedding"]),
                         tensor_values("model.embed_tokens.weight", (vocab, hidden)))
    report = {
        "checkpoint_bytes": sum(sizes), "shards": len(sizes), "largest_shard_bytes": max(sizes),
        "largest_output_array_bytes": largest_output, "peak_rss_bytes": peak, "dry_run_rss_bytes": baseline,
        "peak_minus_dry_run_bytes": peak - baseline, "values_match": bool(ok),
    }
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    print(f"checkpoint {gib(sum(sizes))} in {len(sizes)} shards (largest {gib(max(sizes))}); largest output array "
          f"{gib(largest_output)}; import peak RSS {gib(peak)} = {gib(baseline)} for a dry run + "
          f"{gib(peak - baseline)} ({(peak - baseline) / max(sizes):.2f} x the largest shard); "
          f"values match: {bool(ok)}")
    print(json.dumps(report))
    return report


def define_flags() -> None:
    """The command line's flags (defined only when run as a script, so importing this module defines none)."""
    flags.DEFINE_float("gigabytes", 2.1, "size of the synthetic float16 checkpoint")
    flags.DEFINE_float("shard_megabytes", 500, "safetensors shard size at most")
    flags.DEFINE_string("workdir", None, "where the checkpoint, its import and the config go", required=True)


def main(argv) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax's INFO lines would bury the report
    measure(flags.FLAGS.gigabytes, flags.FLAGS.shard_megabytes, flags.FLAGS.workdir)


if __name__ == "__main__":
    define_flags()
    app.run(main)
