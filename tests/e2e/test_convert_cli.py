"""`vllama-convert` on real files: the original layouts written with torch at a tiny size (EVA ViT in fp16, a
BLIP-2 LAVIS checkpoint, a sharded Hugging Face Llama folder, a Video-LLaMA branch checkpoint), imported to orbax,
run against the PyTorch reference, exported back bit for bit, and refused when wrong."""
import contextlib
import dataclasses
import functools
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from vllama_jax.config import model_config
from vllama_jax.convert import imagebind as ib_map
from vllama_jax.convert import sources as src
from vllama_jax.convert.mapping import flatten
from vllama_jax.convert.video_llama import (
    UNUSED_KEYS,
    export_state_dict,
    scanned_subtrees,
    video_llama_rules,
)
from vllama_jax.models.video_llama import VideoLlama, init_params
from vllama_jax.testing.jobs import environment
from vllama_jax.testing.torch_reference import TorchVideoLlama

CONFIG = "--config=configs/video_llama.py:tiny"


IMAGE_TOKEN = 512


BRANCH = ("video_Qformer.", "video_query_tokens", "video_frame_position_embedding.", "llama_proj.")


def convert(repo_root, *args, ok=True):
    result = subprocess.run(["vllama-convert", *map(str, args)], cwd=repo_root, env=environment(), capture_output=True,
                            text=True, timeout=600)
    assert (result.returncode == 0) == ok, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def convert_here(repo_root, *args):
    """`vllama-convert` in this process, so a test can monkeypatch what it calls: (exit code, stdout, stderr)."""
    from vllama_jax.convert.main import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.chdir(repo_root), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # --help
            code = exit_.code
    return code, stdout.getvalue(), stderr.getvalue()


def refused_import(repo_root, tmp_path, sources, *extra):
    """An import that must fail: checks it wrote nothing (no output, no temporary sibling); returns stderr."""
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    args = [a for s in sources for a in ("--source", s)]
    result = convert(repo_root, "import", CONFIG, "--out", out, *args, *extra, ok=False)
    assert not out.exists() and not leftovers(out)
    return result.stderr


def leftovers(out):
    """Whatever a writer left beside `out` (`out.partial`, `out.orbax-checkpoint-tmp…`, `out.sources.json`)."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(out.name)]


def progress_keys(stdout):
    """The names on the `[i/N] name shape dtype` progress lines, after checking i counts 1..N."""
    lines = re.findall(r"^ +\[(\d+)/(\d+)\] (\S+) \(", stdout, re.M)
    assert [int(i) for i, _, _ in lines] == list(range(1, len(lines) + 1)), stdout
    assert {int(n) for _, n, _ in lines} == {len(lines)}, stdout
    return [name for _, _, name in lines]


def restored(path):
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path.absolute())


def as_torch(state):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_config):
    """The reference model and its weights split across the four kinds of file people have."""
    cfg = dataclasses.replace(model_config(tiny_config), image_token_id=IMAGE_TOKEN)
    torch_model = TorchVideoLlama(cfg, IMAGE_TOKEN)
    with torch.no_grad():  # eva_vit_g.pth is stored in fp16: make the reference hold exactly those values
        for p in torch_model.visual_encoder.parameters():
            p.copy_(p.half().float())
    state = torch_model.original_state_dict()
    root = tmp_path_factory.mktemp("torch_files")
    eva = {k.removeprefix("visual_encoder."): v.astype(np.float16)
           for k, v in state.items() if k.startswith("visual_encoder.")}
    eva["norm.weight"] = np.ones(48, np.float16)  # in the file, skipped by the original's strict=False load
    torch.save(as_torch(eva), root / "eva_vit_g.pth")
    blip2 = {k: v for k, v in state.items() if k.startswith(("Qformer.", "query_tokens", "ln_vision."))}
    blip2["t5_proj.weight"] = np.zeros((8, 32), np.float32)  # BLIP-2's bridge to T5, dropped on purpose
    torch.save({"model": as_torch(blip2)}, root / "blip2_pretrained.pth")
    torch_model.llama_model.save_pretrained(root / "llama-hf", max_shard_size="100KB")
    branch = {k: v for k, v in state.items() if k.startswith(BRANCH)}
    torch.save({"model": as_torch(branch)}, root / "video_llama_branch.pth")
    return torch_model, state, root, cfg


@pytest.fixture(scope="module")
def imported(repo_root, files, tmp_path_factory):
    _, _, root, _ = files
    out = tmp_path_factory.mktemp("orbax") / "all"
    result = convert(repo_root, "import", CONFIG, "--out", out, "--source", root / "eva_vit_g.pth",
                     "--source", root / "blip2_pretrained.pth", "--source", root / "llama-hf",
                     "--source", root / "video_llama_branch.pth")
    return out, result.stdout


def test_import_runs_like_the_pytorch_model(files, imported):
    torch_model, _, root, cfg = files
    out, stdout = imported
    assert len(list((root / "llama-hf").glob("*.safetensors"))) > 1  # a sharded folder with its index
    assert "dropped on purpose" in stdout and "t5_proj.weight" in stdout
    assert re.search(r"visual_encoder\s+[\d,]+\s+[\d.]+\s+float16\s+<- eva_vit_g.pth", stdout), stdout
    assert re.search(r"llama_model .*<- model-0000\d-of-0000\d.safetensors", stdout), stdout
    assert re.search(r"\[\d+/\d+\] llama_model/lm_head/kernel \(64, 512\) float32", stdout)  # progress, array by array
    report = json.loads(out.with_name(out.name + ".sources.json").read_text())
    assert report["parameters"]["llama_proj/kernel"].endswith("video_llama_branch.pth")
    assert report["parameters"]["visual_encoder/cls_token"].endswith("eva_vit_g.pth")
    params = restored(out)
    assert sorted(progress_keys(stdout)) == sorted(flatten(params))
    assert params["visual_encoder"]["cls_token"].dtype == np.float16  # dtype preserved
    params32 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((2, 3, 28, 28, 3)).astype(np.float32)
    ids = rng.integers(3, 500, (2, 12)).astype(np.int32)
    ids[:, 0], ids[:, 1:5] = 1, IMAGE_TOKEN
    mask = np.ones((2, 12), bool)
    logits, soft = jax.jit(VideoLlama(cfg).apply)({"params": params32}, frames, ids, mask)
    labels = np.full((2, 12), -100)
    with torch.no_grad():
        _, t_logits, t_soft = torch_model(torch.from_numpy(frames).permute(0, 1, 4, 2, 3), torch.from_numpy(ids).long(),
                                          torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(labels).long())
    assert np.abs(np.asarray(soft["video"]) - t_soft.numpy()).max() <= 1e-5
    assert np.abs(np.asarray(logits) - t_logits.numpy()).max() <= 1e-5


def test_export_gives_back_the_original_tensors_bit_for_bit(repo_root, files, imported, tmp_path):
    _, state, root, _ = files
    out, _ = imported
    result = convert(repo_root, "export", CONFIG, "--params", out, "--out", tmp_path / "video_llama.pth")
    exported = torch.load(tmp_path / "video_llama.pth", weights_only=True)["model"]
    assert sorted(progress_keys(result.stdout)) == sorted(exported)  # a progress line per array
    kept = {k: v for k, v in state.items() if not any(re.fullmatch(p, k) for p in UNUSED_KEYS)}
    assert exported.keys() == kept.keys()
    for key, value in kept.items():
        want = value.astype(np.float16) if key.startswith("visual_encoder.") else value  # as the source file held it
        got = exported[key].numpy()
        assert got.dtype == want.dtype and np.array_equal(got, want), key
    # the original demo's `ckpt`: the trainable parts only
    result = convert(repo_root, "export", CONFIG, "--params", out, "--trainable_only", "--out", tmp_path / "ckpt.pth")
    trainable = torch.load(tmp_path / "ckpt.pth", weights_only=True)["model"]
    assert sorted(trainable) == sorted(k for k in kept if k.startswith(BRANCH))
    assert sorted(progress_keys(result.stdout)) == sorted(trainable)


def test_hf_export_loads_in_transformers_with_the_same_logits(repo_root, files, imported, tmp_path):
    from transformers import LlamaForCausalLM

    torch_model, _, _, _ = files
    out, _ = imported
    result = convert(repo_root, "export", CONFIG, "--params", out, "--format", "hf_llama", "--out", tmp_path / "hf")
    weight_map = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert weight_map and sorted(progress_keys(result.stdout)) == sorted(weight_map)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, torch_model.llama_model(ids).logits)


def test_refusals_name_the_problem_and_write_nothing(repo_root, files, tmp_path):
    _, state, root, _ = files
    good = [root / "eva_vit_g.pth", root / "blip2_pretrained.pth", root / "llama-hf", root / "video_llama_branch.pth"]

    refused = functools.partial(refused_import, repo_root, tmp_path)

    # an unknown key
    branch = torch.load(root / "video_llama_branch.pth", weights_only=True)
    branch["model"]["video_Qformer.mystery"] = torch.zeros(3)
    torch.save(branch, tmp_path / "unknown.pth")
    assert "video_Qformer.mystery" in refused(good[:3] + [tmp_path / "unknown.pth"])
    # a missing key: no branch checkpoint, so the trainable parts have no source (fine with --part frozen)
    assert "missing llama_proj.weight" in refused(good[:3])
    # a wrong shape
    branch = torch.load(root / "video_llama_branch.pth", weights_only=True)
    branch["model"]["llama_proj.weight"] = branch["model"]["llama_proj.weight"].T.contiguous()
    torch.save(branch, tmp_path / "transposed.pth")
    assert re.search(r"llama_proj.weight in .*transposed.pth: shape \(32, 64\), expected \(64, 32\)",
                     refused(good[:3] + [tmp_path / "transposed.pth"]))
    # a truncated shard
    broken = tmp_path / "llama-broken"
    __import__("shutil").copytree(root / "llama-hf", broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert f"{shard.name}: truncated" in refused(good[:2] + [broken, good[3]])
    # a file that is not a checkpoint
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert "junk.pth: not a readable PyTorch checkpoint" in refused([tmp_path / "junk.pth"])


@pytest.fixture(scope="module")
def frozen_import(repo_root, files, tmp_path_factory):
    _, _, root, _ = files
    out = tmp_path_factory.mktemp("orbax") / "frozen"
    convert(repo_root, "import", CONFIG, "--part", "frozen", "--dtype", "float32", "--out", out,
            "--source", root / "eva_vit_g.pth", "--source", root / "blip2_pretrained.pth",
            "--source", root / "llama-hf")
    return out


def test_frozen_part_feeds_the_trainer(files, frozen_import):
    """--part frozen is exactly what train.frozen_checkpoint reads: the frozen subtrees, in the model's dtype
    (restored here without shardings; onto a mesh in the next test)."""
    _, _, _, cfg = files
    from vllama_jax.checkpoints import restore_params
    from vllama_jax.convert.main import abstract_params
    from vllama_jax.models.video_llama import VISUAL_TRAINABLE
    from vllama_jax.sharded_model import split_params

    frozen = restore_params(frozen_import, split_params(abstract_params(cfg), VISUAL_TRAINABLE)[1])
    assert frozen["visual_encoder"]["cls_token"].dtype == np.float32
    assert set(frozen) == {"visual_encoder", "ln_vision", "Qformer", "query_tokens", "llama_model"}


def test_frozen_part_restores_onto_an_fsdp_mesh_shard_by_shard(files, frozen_import):
    """The imported checkpoint restored onto 8 simulated devices (fsdp=8) with the model's NamedShardings: every
    array arrives with its target sharding, each device holding only its shard, and the values are the source's."""

    from vllama_jax.checkpoints import restore_params
    from vllama_jax.models.video_llama import VISUAL_TRAINABLE
    from vllama_jax.sharded_model import split_params
    from vllama_jax.sharding import make_mesh, mesh_shardings

    _, state, _, cfg = files
    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    abstract = jax.eval_shape(lambda: init_params(VideoLlama(cfg), jax.random.PRNGKey(0)))
    boxed = split_params(abstract, VISUAL_TRAINABLE)[1]
    shardings = mesh_shardings(boxed, mesh)
    frozen = restore_params(frozen_import, nn.unbox(boxed), shardings)
    split = 0
    leaves = jax.tree_util.tree_flatten_with_path(frozen)[0]
    for (path, array), sharding in zip(leaves, jax.tree_util.tree_leaves(shardings)):
        name = jax.tree_util.keystr(path)
        shard_shape = sharding.shard_shape(array.shape)
        assert array.sharding == sharding, name
        assert len(array.addressable_shards) == 8, name
        assert {s.data.shape for s in array.addressable_shards} == {shard_shape}, name
        split += shard_shape != array.shape
    assert split >= 10  # the fsdp axis really divides the weights (embed, encoder_embed)
    assert frozen["llama_model"]["embed_tokens"]["embedding"].addressable_shards[0].data.shape == (512, 8)
    rules = [r for r in video_llama_rules(cfg) if r.targets[0].split("/")[0] in frozen]
    exported = export_state_dict(jax.tree_util.tree_map(np.asarray, frozen), rules,
                                 [p for p, _ in scanned_subtrees(cfg)])
    kept = [k for k in state if not k.startswith(BRANCH) and not any(re.fullmatch(p, k) for p in UNUSED_KEYS)]
    assert sorted(exported) == sorted(kept)
    for key in kept:
        np.testing.assert_array_equal(exported[key], state[key], err_msg=key)


def test_trainable_part_starts_a_run(repo_root, files, tmp_path):
    """--part trainable is what train.init_trainable reads (the released branch checkpoint as starting weights)."""
    from vllama_jax.checkpoints import restore_trainable
    from vllama_jax.convert.main import abstract_params
    from vllama_jax.models.video_llama import VISUAL_TRAINABLE
    from vllama_jax.sharded_model import split_params

    _, state, root, cfg = files
    convert(repo_root, "import", CONFIG, "--part", "trainable", "--out", tmp_path / "branch",
            "--source", root / "video_llama_branch.pth")
    abstract = split_params(abstract_params(cfg), VISUAL_TRAINABLE)[0]
    trainable = restore_trainable(tmp_path / "branch", abstract)
    np.testing.assert_array_equal(trainable["llama_proj"]["kernel"], state["llama_proj.weight"].T)
    np.testing.assert_array_equal(trainable["video_query_tokens"], state["video_query_tokens"])


def test_import_memory_is_bounded_by_one_shard_and_one_array(tmp_path):
    """A sharded Llama checkpoint (synthetic, ~0.45 GB in 5 safetensors shards) imported by the CLI in a child
    process: its peak RSS above a dry run of the same command stays within one source shard plus one output
    array (plus 128 MiB of fixed buffers). `python -m vllama_jax.bench.convert_memory` runs it at 2 GB."""
    from vllama_jax.bench import convert_memory

    report = convert_memory.measure(gigabytes=0.4, shard_megabytes=100, workdir=tmp_path)
    assert report["values_match"] and report["shards"] >= 4
    bound = report["largest_shard_bytes"] + report["largest_output_array_bytes"] + 128 * 2**20
    assert report["peak_minus_dry_run_bytes"] <= bound, report


def test_a_source_of_another_dtype_kind_is_refused(repo_root, files, tmp_path):
    """An integer tensor cannot hold a float parameter's values: refused before anything is written, naming the
    file, the key and both dtypes, also when --dtype would cast it; a --dtype of another kind is refused too."""
    _, _, root, _ = files
    frozen_sources = [root / "eva_vit_g.pth", root / "blip2_pretrained.pth", root / "llama-hf"]
    branch = torch.load(root / "video_llama_branch.pth", weights_only=True)
    branch["model"]["llama_proj.bias"] = torch.arange(64, dtype=torch.int64)
    torch.save(branch, tmp_path / "int_bias.pth")
    message = (f"llama_proj.bias in {tmp_path / 'int_bias.pth'}: dtype int64, but llama_proj/bias is a floating "
               "parameter (float32)")
    assert message in refused_import(repo_root, tmp_path, frozen_sources + [tmp_path / "int_bias.pth"])
    out = tmp_path / "cast"
    code, _, stderr = convert_here(repo_root, "import", CONFIG, "--part", "trainable", "--dtype", "float32",
                                   "--out", out, "--source", tmp_path / "int_bias.pth")
    assert code == 2 and message in stderr and not leftovers(out)
    code, _, stderr = convert_here(repo_root, "import", CONFIG, "--part", "trainable", "--dtype", "int32",
                                   "--out", out, "--source", root / "video_llama_branch.pth")
    assert code == 2 and "--dtype int32 cannot hold floating parameters" in stderr and not leftovers(out)


def test_a_failed_import_write_leaves_no_partial_output(repo_root, files, tmp_path, monkeypatch):
    """A read failing half-way through writing (a disk error, a file changed underneath) re-raises and leaves
    neither the output, nor orbax's temporary directory, nor the sources report."""
    _, _, root, _ = files
    real_load, calls = src.Tensor.load, []

    def failing_load(tensor):
        calls.append(tensor.key)
        if len(calls) == 3:
            raise OSError("simulated read error")
        return real_load(tensor)

    monkeypatch.setattr(src.Tensor, "load", failing_load)
    out = tmp_path / "branch"
    with pytest.raises(OSError, match="simulated read error"):
        convert_here(repo_root, "import", CONFIG, "--part", "trainable", "--out", out,
                     "--source", root / "video_llama_branch.pth")
    assert len(calls) == 3 and not out.exists() and leftovers(out) == []


def test_a_failed_export_write_leaves_no_partial_output(repo_root, files, imported, tmp_path, monkeypatch):
    """The original-layout writer and the Hugging Face writer remove their `.partial` output when writing fails."""
    from vllama_jax.convert.torch_io import save_hf_llama

    _, _, _, cfg = files
    checkpoint, _ = imported

    def torch_save_fails_half_way(obj, path):
        Path(path).write_bytes(b"PK\x03\x04 half a file")
        raise OSError("simulated disk full")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", torch_save_fails_half_way)
        with pytest.raises(OSError, match="simulated disk full"):
            convert_here(repo_root, "export", CONFIG, "--params", checkpoint, "--out", tmp_path / "vl.pth")
    assert leftovers(tmp_path / "vl.pth") == []

    import safetensors.torch

    real_save_file, shards = safetensors.torch.save_file, []

    def second_shard_fails(tensors, filename, metadata=None):
        shards.append(filename)
        if len(shards) == 2:
            raise OSError("simulated disk full")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", second_shard_fails)
    state = {f"model.layers.{i}.mlp.up_proj.weight": np.ones((64, 32), np.float32) for i in range(3)}
    lines = []
    with pytest.raises(OSError, match="simulated disk full"):
        save_hf_llama(state, cfg.llm, tmp_path / "hf", max_shard_bytes=64 * 32 * 4, progress=lines.append)
    assert len(lines) == 1 and leftovers(tmp_path / "hf") == []  # one shard was written, then removed


def test_later_sources_override_earlier_ones_key_by_key(repo_root, files, tmp_path):
    """A second file holding llama_proj (MiniGPT-4's projection layout) wins for llama_proj when given after the
    branch checkpoint and loses when given before it; the rest always comes from the branch checkpoint, and
    `<out>.sources.json` names the file of every parameter."""
    _, state, root, _ = files
    branch, proj = root / "video_llama_branch.pth", tmp_path / "pretrained_minigpt4.pth"
    rng = np.random.default_rng(1)
    proj_state = {k: rng.standard_normal(state[k].shape).astype(np.float32)
                  for k in ("llama_proj.weight", "llama_proj.bias")}
    torch.save({"model": as_torch(proj_state)}, proj)
    for order, proj_wins in (((branch, proj), True), ((proj, branch), False)):
        out = tmp_path / f"proj_{'last' if proj_wins else 'first'}"
        result = convert(repo_root, "import", CONFIG, "--part", "trainable", "--out", out,
                         *[a for s in order for a in ("--source", s)])
        origin = json.loads(out.with_name(out.name + ".sources.json").read_text())["parameters"]
        params = restored(out)
        assert sorted(origin) == sorted(flatten(params))
        want = proj_state if proj_wins else state
        for name in ("llama_proj/kernel", "llama_proj/bias"):
            assert origin[name] == str(proj if proj_wins else branch), name
        np.testing.assert_array_equal(params["llama_proj"]["kernel"], want["llama_proj.weight"].T)
        np.testing.assert_array_equal(params["llama_proj"]["bias"], want["llama_proj.bias"])
        assert {f for k, f in origin.items() if not k.startswith("llama_proj/")} == {str(branch)}
        np.testing.assert_array_equal(params["video_query_tokens"], state["video_query_tokens"])
        winner = proj.name if proj_wins else branch.name
        assert re.search(rf"llama_proj .*<- {winner}$", result.stdout, re.M), result.stdout


@pytest.fixture(scope="module")
def bin_llama(files):
    """The LLM as a Hugging Face folder of `pytorch_model-0000X-of-00003.bin` shards with their index."""
    torch_model, _, root, _ = files
    folder = root / "llama-bin"
    folder.mkdir()
    torch_model.llama_model.config.save_pretrained(folder)
    hf_state = {k: v.clone() for k, v in torch_model.llama_model.state_dict().items()}
    weight_map = {}
    names = sorted(hf_state)
    for i in range(3):
        keys = names[i * len(names) // 3:(i + 1) * len(names) // 3]
        name = f"pytorch_model-{i + 1:05d}-of-00003.bin"
        torch.save({k: hf_state[k] for k in keys}, folder / name)
        weight_map.update({k: name for k in keys})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, {k: v.numpy() for k, v in hf_state.items()}


def test_sharded_pytorch_bin_llama_folder_imports_value_for_value(repo_root, files, bin_llama, tmp_path):
    """A Hugging Face folder of `.bin` shards with `pytorch_model.bin.index.json` through the CLI: every LLM tensor
    comes back from the orbax checkpoint equal to the source, dtype included, and the report names its shard."""
    _, _, _, cfg = files
    folder, hf_state = bin_llama
    out = tmp_path / "llm"
    result = convert(repo_root, "import", CONFIG, "--part", "llama_model", "--out", out, "--source", folder)
    assert f"source {folder}: hf_llama, {len(hf_state)} tensors in 3 file(s)" in result.stdout
    origin = json.loads(out.with_name(out.name + ".sources.json").read_text())["parameters"]
    assert re.fullmatch(rf"{re.escape(str(folder))}/pytorch_model-0000\d-of-00003.bin",
                        origin["llama_model/lm_head/kernel"])
    rules = [r for r in video_llama_rules(cfg) if r.source.startswith("llama_model.")]
    exported = export_state_dict(restored(out), rules, [p for p, _ in scanned_subtrees(cfg)])
    assert sorted(exported) == sorted(f"llama_model.{k}" for k in hf_state)
    for key, value in hf_state.items():
        got = exported[f"llama_model.{key}"]
        assert got.dtype == value.dtype and np.array_equal(got, value), key


def test_help_lists_every_option(repo_root):
    result = subprocess.run(["vllama-convert", "--help"], env=environment(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "import" in result.stdout and "export" in result.stdout, result.stderr[-2000:]
    options = {"import": ("--config", "--source", "--out", "--part", "--dtype", "--dry_run", "--drop_audio"),
               "export": ("--config", "--params", "--format", "--out", "--trainable_only")}
    for command, names in options.items():
        code, stdout, _ = convert_here(repo_root, command, "--help")
        assert code == 0 and all(name in stdout for name in names), stdout


def test_config_overrides_reach_the_model_and_main_runs_again(repo_root, files, tmp_path):
    """`--config.<field>=<value>` changes the model the sources must fill (one LLM layer more than the files hold is
    refused by name); the same in-process `main` then dry-runs the unchanged config; a hyphenated flag is refused in
    one line that names the snake_case spelling. Nothing is written."""
    _, _, root, cfg = files
    names = ("eva_vit_g.pth", "blip2_pretrained.pth", "llama-hf", "video_llama_branch.pth")
    sources = [a for name in names for a in ("--source", root / name)]
    out = tmp_path / "out"
    layers = cfg.llm.num_layers
    code, _, stderr = convert_here(repo_root, "import", CONFIG, f"--config.model.llm.num_layers={layers + 1}",
                                   "--dry_run", "--out", out, *sources)
    assert code == 2 and f"missing llama_model.model.layers.{layers}." in stderr, stderr
    code, stdout, _ = convert_here(repo_root, "import", CONFIG, "--dry_run", "--out", out, *sources)
    assert code == 0 and "nothing written" in stdout, stdout
    code, _, stderr = convert_here(repo_root, "import", CONFIG, "--dry-run", "--out", out, *sources)
    assert code == 2 and stderr.startswith("vllama-convert: ") and stderr.count("\n") == 1 and "dry_run" in stderr
    assert not out.exists() and not leftovers(out)


def test_a_truncated_pth_is_refused_with_its_name(repo_root, files, bin_llama, tmp_path):
    """A `.pth` cut short (at any point) and a cut `.bin` shard of a Hugging Face folder: refused naming the file;
    through the CLI nothing is written."""
    _, _, root, _ = files
    data = (root / "video_llama_branch.pth").read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 64):
        truncated = tmp_path / f"branch_{cut}.pth"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=re.escape(f"{truncated}: not a readable PyTorch checkpoint")):
            src.open_source(truncated)
    folder = tmp_path / "llama-bin-broken"
    shutil.copytree(bin_llama[0], folder)
    shard = folder / "pytorch_model-00002-of-00003.bin"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(f"{shard}: not a readable PyTorch checkpoint")):
        src.open_source(folder)
    truncated = tmp_path / f"branch_{len(data) // 2}.pth"
    sources = [root / "eva_vit_g.pth", root / "blip2_pretrained.pth", root / "llama-hf", truncated]
    stderr = refused_import(repo_root, tmp_path, sources)
    assert f"{truncated}: not a readable PyTorch checkpoint" in stderr


CONFIG_FILE = '''
from vllama_jax.config import load_config


def get_config(arg=""):
    """tiny,audio_stage1 sized like vllama_jax/testing/imagebind_reference.py (vision at the 224 px the original
    code fixes)."""
    config = load_config("{repo}/configs/video_llama.py:tiny,audio_stage1")
    config.model.imagebind_vision.input_size = (224, 224)
    config.model.imagebind_audio.width, config.model.imagebind_audio.mlp_dim = 32, 128  # the reference's sizes
    config.model.num_audio_query_tokens = 8
    return config
'''


def test_vllama_convert_imports_and_exports_imagebind_huge_pth(repo_root, tmp_path, audio_model):
    """An `imagebind_huge.pth`-layout file (all six modalities, as the real one) plus a Video-LLaMA audio-branch
    checkpoint (`{'model': audio_*}`, the original's `ckpt_2`) → `vllama-convert import` → orbax → `export`
    gives every tensor back bit for bit under the original keys; the four unused modalities are reported as
    dropped; a wrong-shaped tensor is refused by name and nothing is written."""
    import orbax.checkpoint as ocp

    torch_branch = audio_model[3]
    config = tmp_path / "audio_config.py"
    config.write_text(CONFIG_FILE.format(repo=repo_root))
    state = {k: v.clone() for k, v in torch_branch.audio_encoder.state_dict().items()}
    torch.save(state, tmp_path / "imagebind_huge.pth")
    glue = {k: v for k, v in torch_branch.original_state_dict().items() if not k.startswith("audio_encoder.")}
    torch.save({"model": as_torch(glue)}, tmp_path / "audio_branch.pth")
    out = tmp_path / "imagebind_orbax"
    part = "audio_encoder,audio_position_embedding,audio_Qformer,audio_query_tokens,audio_llama_proj"
    result = convert(
        repo_root,
        "import",
        f"--config={config}",
        "--part",
        part,
        "--out",
        out,
        "--source",
        tmp_path / "imagebind_huge.pth",
        "--source",
        tmp_path / "audio_branch.pth",
    )
    assert re.search(r"dropped on purpose from \S*imagebind_huge.pth: \d+ keys", result.stdout), result.stdout
    assert re.search(r"audio_encoder\s+[\d,]+\s+[\d.]+\s+float32\s+<- imagebind_huge.pth", result.stdout), result.stdout
    assert re.search(r"audio_Qformer\s+[\d,]+\s+[\d.]+\s+float32\s+<- audio_branch.pth", result.stdout), result.stdout
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(out.absolute())
    assert sorted(restored) == sorted(part.split(",")) and sorted(restored["audio_encoder"]) == ["audio", "vision"]

    exported = tmp_path / "exported.pth"
    convert(repo_root, "export", f"--config={config}", "--params", out, "--out", exported)
    back = torch.load(exported, weights_only=True)["model"]
    kept = {
        f"audio_encoder.{k}": v for k, v in state.items() if not any(re.fullmatch(p, k) for p in ib_map.UNUSED_KEYS)
    }
    kept.update(as_torch({k: v for k, v in glue.items() if not any(re.fullmatch(p, k) for p in UNUSED_KEYS)}))
    assert back.keys() == kept.keys()
    for key, value in kept.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key

    state["modality_trunks.audio.blocks.1.attn.bias_k"] = torch.zeros(1, 1, 31)
    torch.save(state, tmp_path / "bad.pth")
    bad = convert(
        repo_root,
        "import",
        f"--config={config}",
        "--part",
        "audio_encoder",
        "--out",
        tmp_path / "bad_out",
        "--source",
        tmp_path / "bad.pth",
        ok=False,
    )
    assert "audio_encoder.modality_trunks.audio.blocks.1.attn.bias_k" in bad.stderr and "(1, 1, 31)" in bad.stderr
    assert not (tmp_path / "bad_out").exists()
