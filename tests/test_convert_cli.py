"""`vllama-convert` on real files: the original layouts written with torch at a tiny size (EVA ViT in fp16, a
BLIP-2 LAVIS checkpoint, a sharded Hugging Face Llama folder, a Video-LLaMA branch checkpoint), imported to orbax,
run against the PyTorch reference, exported back bit for bit, and refused when wrong."""
import dataclasses
import json
import re
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from vllama_jax.bench.torch_reference import TorchVideoLlama
from test_trainer import environment
from vllama_jax.config import model_config
from vllama_jax.convert.video_llama import UNUSED_KEYS
from vllama_jax.models.video_llama import VideoLlama

CONFIG = "--config=configs/video_llama.py:tiny"
IMAGE_TOKEN = 512
BRANCH = ("video_Qformer.", "video_query_tokens", "video_frame_position_embedding.", "llama_proj.")


def convert(repo_root, *args, ok=True):
    result = subprocess.run(["vllama-convert", *map(str, args)], cwd=repo_root, env=environment(), capture_output=True,
                            text=True, timeout=600)
    assert (result.returncode == 0) == ok, result.stdout[-2000:] + result.stderr[-2000:]
    return result


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
    eva = {k.removeprefix("visual_encoder."): v.astype(np.float16) for k, v in state.items() if k.startswith("visual_encoder.")}
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
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(out.absolute())
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
    convert(repo_root, "export", CONFIG, "--params", out, "--out", tmp_path / "video_llama.pth")
    exported = torch.load(tmp_path / "video_llama.pth", weights_only=True)["model"]
    kept = {k: v for k, v in state.items() if not any(re.fullmatch(p, k) for p in UNUSED_KEYS)}
    assert exported.keys() == kept.keys()
    for key, value in kept.items():
        want = value.astype(np.float16) if key.startswith("visual_encoder.") else value  # as the source file held it
        got = exported[key].numpy()
        assert got.dtype == want.dtype and np.array_equal(got, want), key
    # the original demo's `ckpt`: the trainable parts only
    convert(repo_root, "export", CONFIG, "--params", out, "--trainable-only", "--out", tmp_path / "ckpt.pth")
    trainable = torch.load(tmp_path / "ckpt.pth", weights_only=True)["model"]
    assert sorted(trainable) == sorted(k for k in kept if k.startswith(BRANCH))


def test_hf_export_loads_in_transformers_with_the_same_logits(repo_root, files, imported, tmp_path):
    from transformers import LlamaForCausalLM

    torch_model, _, _, _ = files
    out, _ = imported
    convert(repo_root, "export", CONFIG, "--params", out, "--format", "hf_llama", "--out", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, torch_model.llama_model(ids).logits)


def test_refusals_name_the_problem_and_write_nothing(repo_root, files, tmp_path):
    _, state, root, _ = files
    good = [root / "eva_vit_g.pth", root / "blip2_pretrained.pth", root / "llama-hf", root / "video_llama_branch.pth"]

    def refused(sources, *extra):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        args = [a for s in sources for a in ("--source", s)]
        result = convert(repo_root, "import", CONFIG, "--out", out, *args, *extra, ok=False)
        assert not out.exists() and not list(tmp_path.glob(f"{out.name}*"))
        return result.stderr

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
    assert re.search(r"llama_proj.weight in .*transposed.pth: shape \(32, 64\), expected \(64, 32\)", refused(good[:3] + [tmp_path / "transposed.pth"]))
    # a truncated shard
    broken = tmp_path / "llama-broken"
    __import__("shutil").copytree(root / "llama-hf", broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert f"{shard.name}: truncated" in refused(good[:2] + [broken, good[3]])
    # a file that is not a checkpoint
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert "junk.pth: not a readable PyTorch checkpoint" in refused([tmp_path / "junk.pth"])


def test_frozen_part_feeds_the_trainer(repo_root, files, tmp_path):
    """--part frozen is exactly what train.frozen_checkpoint reads (restored into shardings, checked)."""
    _, _, root, cfg = files
    convert(repo_root, "import", CONFIG, "--part", "frozen", "--dtype", "float32", "--out", tmp_path / "frozen",
            "--source", root / "eva_vit_g.pth", "--source", root / "blip2_pretrained.pth", "--source", root / "llama-hf")
    from vllama_jax.convert.main import abstract_params
    from vllama_jax.train.checkpoints import restore_params
    from vllama_jax.train.step import split_params
    from vllama_jax.models.video_llama import VISUAL_TRAINABLE

    frozen = restore_params(tmp_path / "frozen", split_params(abstract_params(cfg), VISUAL_TRAINABLE)[1])
    assert frozen["visual_encoder"]["cls_token"].dtype == np.float32
    assert set(frozen) == {"visual_encoder", "ln_vision", "Qformer", "query_tokens", "llama_model"}


def test_trainable_part_starts_a_run(repo_root, files, tmp_path):
    """--part trainable is what train.init_trainable reads (the released branch checkpoint as starting weights)."""
    from types import SimpleNamespace

    from vllama_jax.convert.main import abstract_params
    from vllama_jax.models.video_llama import VISUAL_TRAINABLE
    from vllama_jax.train.step import split_params
    from vllama_jax.train.trainer import restore_trainable

    _, state, root, cfg = files
    convert(repo_root, "import", CONFIG, "--part", "trainable", "--out", tmp_path / "branch", "--source", root / "video_llama_branch.pth")
    abstract = split_params(abstract_params(cfg), VISUAL_TRAINABLE)[0]
    trainable = restore_trainable(str(tmp_path / "branch"), SimpleNamespace(trainable=abstract), SimpleNamespace(trainable=None))
    np.testing.assert_array_equal(trainable["llama_proj"]["kernel"], state["llama_proj.weight"].T)
    np.testing.assert_array_equal(trainable["video_query_tokens"], state["video_query_tokens"])


def test_import_memory_is_bounded_by_one_shard_and_one_array(tmp_path):
    """A sharded Llama checkpoint (synthetic, ~0.45 GB in 5 safetensors shards) imported by the CLI in a child
    process: its peak RSS above a dry run of the same command stays within one source shard plus one output
    array (plus 128 MiB of fixed buffers). `python -m vllama_jax.convert.memory_check` runs it at 2 GB."""
    from vllama_jax.convert import memory_check

    report = memory_check.main(["--gigabytes", "0.4", "--shard-megabytes", "100", "--workdir", str(tmp_path)])
    assert report["values_match"] and report["shards"] >= 4
    bound = report["largest_shard_bytes"] + report["largest_output_array_bytes"] + 128 * 2**20
    assert report["peak_minus_dry_run_bytes"] <= bound, report
