"""`vllama-train` on the tiny config: exact resume after SIGKILL, SIGTERM saves and exits 0, frozen stays frozen."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

STEPS = 150


# the tiny default at test size: fewer clips, a short LLM pretraining, no held-out captioning at the end
SMALL = {"batch_size": 2, "data.synthetic_clips": 12, "data.synthetic_eval_clips": 16, "llm_pretraining.steps": 20,
         "eval.at_end": False}
SMALL_ARGS = [f"--config.{k}={v}" for k, v in SMALL.items()]


def command(workdir):
    return ["vllama-train", "--config=configs/video_llama.py:tiny", f"--workdir={workdir}", *SMALL_ARGS,
            f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=4", "--config.train.log_every=1000"]


def environment():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def losses(workdir):
    """step -> loss, the last record of each step winning (a resumed run rewrites the steps after its checkpoint)."""
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


def run(workdir, repo_root):
    result = subprocess.run(command(workdir), cwd=repo_root, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def interrupt(workdir, repo_root, sig, after_step=9):
    """Start a run and send `sig` once it has logged `after_step` steps; returns the exit code."""
    proc = subprocess.Popen(command(workdir), cwd=repo_root, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = Path(workdir) / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_step:
            proc.send_signal(sig)
            break
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    proc.communicate(timeout=300)
    return proc.returncode


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, tiny_config):
    """The tiny default's data, tokenizer and frozen checkpoint at test size, made once: x264 may encode the
    same frames differently from run to run, so every run here trains on the same bytes (a resumed run reuses
    its work directory's anyway)."""
    from vllama_jax.train import tiny_default

    config = tiny_config.copy_and_resolve_references()
    for key, value in SMALL.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    template = tmp_path_factory.mktemp("synthetic")
    tiny_default.prepare(config, template, log=lambda *_: None)
    return template


def workdir_with_data(path, synthetic):
    for name in ("data", "tokenizer", "frozen"):
        shutil.copytree(synthetic / name, path / name)
    return path


@pytest.fixture(scope="module")
def uninterrupted_run(repo_root, tmp_path_factory, synthetic):
    workdir = workdir_with_data(tmp_path_factory.mktemp("uninterrupted"), synthetic)
    run(workdir, repo_root)
    return workdir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return losses(uninterrupted_run)


def test_training_reduces_the_loss(uninterrupted):
    assert len(uninterrupted) == STEPS
    # only the glue trains here, on 12 clips, with the tiny LLM barely pretrained: a modest but clear fall
    first, last = uninterrupted[1], sum(uninterrupted[s] for s in range(STEPS - 9, STEPS + 1)) / 10
    assert last < first - 0.2, (first, last)


def test_sigkill_then_resume_reproduces_the_losses_bitwise(repo_root, tmp_path, synthetic, uninterrupted):
    workdir_with_data(tmp_path, synthetic)
    code = interrupt(tmp_path, repo_root, signal.SIGKILL)
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = max(losses(tmp_path))
    assert killed_at < STEPS
    result = run(tmp_path, repo_root)
    assert "resumed from step" in result.stdout + result.stderr
    assert losses(tmp_path) == uninterrupted  # every step, bit for bit (json keeps the full float)


def test_sigterm_saves_at_the_step_boundary_and_exits_zero(repo_root, tmp_path, synthetic, uninterrupted):
    workdir_with_data(tmp_path, synthetic)
    code = interrupt(tmp_path, repo_root, signal.SIGTERM)
    assert code == 0
    stopped_at = max(losses(tmp_path))
    assert stopped_at < STEPS
    assert str(stopped_at) in os.listdir(tmp_path / "checkpoints")  # saved where it stopped, not at a multiple of 4
    run(tmp_path, repo_root)
    assert losses(tmp_path) == uninterrupted


def test_stage2_recipe_starts_from_stage1_weights_on_instruction_shards(repo_root, tmp_path, synthetic, uninterrupted_run):
    """`tiny,vision_stage2` on LLaVA-format conversation shards (real JPEGs through vllama-prepare), its trainable
    weights taken from the stage-1 run, its frozen ones from the frozen checkpoint."""
    import numpy as np
    import orbax.checkpoint as ocp

    from vllama_jax.data.prepare import prepare
    from vllama_jax.data.synthetic import SYNTHETIC_COLORS, write_test_image

    media = tmp_path / "images"
    media.mkdir()
    annotations = []
    for i, (name, rgb) in enumerate(SYNTHETIC_COLORS.items()):
        write_test_image(media / f"{i}.jpg", color=rgb)
        annotations.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the left half?"}, {"from": "gpt", "value": f"It is {name}."},
            {"from": "human", "value": "And the right half?"}, {"from": "gpt", "value": "Black."}]})
    (tmp_path / "llava.json").write_text(json.dumps(annotations))
    prepare("llava_instruct", tmp_path / "llava.json", media, tmp_path / "shards", name="llava", log=lambda *_: None)
    # and cc_sbu_align-style captions of the same images, read with stage 2's alignment prompts
    captions = {"annotations": [{"image_id": str(i), "caption": f"The left half is {name}."}
                                for i, name in enumerate(SYNTHETIC_COLORS)]}
    (tmp_path / "cc_sbu_align.json").write_text(json.dumps(captions))
    prepare("image_caption", tmp_path / "cc_sbu_align.json", media, tmp_path / "captions", name="cc_sbu", log=lambda *_: None)

    workdir = tmp_path / "stage2"
    result = subprocess.run(
        ["vllama-train", "--config=configs/video_llama.py:tiny,vision_stage2", f"--workdir={workdir}",
         f"--config.data.shards={tmp_path / 'shards'},{tmp_path / 'captions'}", f"--config.data.tokenizer={synthetic / 'tokenizer'}",
         f"--config.train.frozen_checkpoint={synthetic / 'frozen'}", f"--config.train.init_trainable={uninterrupted_run}",
         "--config.train.steps=2", "--config.batch_size=4"],  # one pass over the 2 × 4 samples
        cwd=repo_root, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"trainable weights from {uninterrupted_run}" in result.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["examples"] == 4 and r["tokens"] > 0 and np.isfinite(r["loss"]) for r in records)
    assert records[0]["learning_rate"] == pytest.approx(1e-6)  # stage 2's warmup start

    def trainable(run_dir, step):
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore((run_dir / "checkpoints" / str(step) / "state").absolute())["trainable"]

    before, after = trainable(uninterrupted_run, STEPS), trainable(workdir, 2)
    changed = 0
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_allclose(b, a, atol=1e-5)  # two AdamW steps at lr ~1e-6 move a weight by ~2e-6
        changed += int(not np.array_equal(a, b))
    assert changed > 0


@pytest.mark.parametrize("audio_source", ["frames", "fbank"])
def test_audio_stage1_trains_only_the_audio_glue(repo_root, tmp_path, synthetic, audio_source):
    """`tiny,audio_stage1` on WebVid-format shards of mp4s with tones: "frames" feeds the video frames through
    ImageBind's vision tower (the paper's audio stages), "fbank" the clips' audio track; only the audio
    Q-Former, its queries, its position embedding and audio_llama_proj are in the train state."""
    import numpy as np
    import orbax.checkpoint as ocp

    from vllama_jax.data.prepare import prepare
    from vllama_jax.data.synthetic import write_test_video

    media = tmp_path / "media" / "tones"
    media.mkdir(parents=True)
    rows = ["videoid,name,page_dir"]
    for i, (hz, words) in enumerate([(330.0, "a low tone"), (660.0, "a middle tone"), (1320.0, "a high tone"), (990.0, "a bright tone")]):
        write_test_video(media / f"{i}.mp4", num_frames=24, fps=8, tone_hz=hz)
        rows.append(f"{i},{words},tones")
    (tmp_path / "tones.csv").write_text("\n".join(rows) + "\n")
    prepare("webvid", tmp_path / "tones.csv", tmp_path / "media", tmp_path / "shards", name="tones", log=lambda *_: None)

    workdir = tmp_path / "audio_stage1"
    result = subprocess.run(
        ["vllama-train", "--config=configs/video_llama.py:tiny,audio_stage1", f"--workdir={workdir}",
         f"--config.data.shards={tmp_path / 'shards'}", f"--config.data.tokenizer={synthetic / 'tokenizer'}",
         f"--config.data.audio_source={audio_source}", "--config.train.steps=2", "--config.batch_size=2",
         "--config.eval.at_end=False"],
        cwd=repo_root, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parameters: 30,400 trainable" in result.stdout, result.stdout  # the tiny audio glue
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["loss"]) and r["examples"] == 2 for r in records)
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore((workdir / "checkpoints" / "2" / "state").absolute())
    assert sorted(state["trainable"]) == ["audio_Qformer", "audio_llama_proj", "audio_position_embedding", "audio_query_tokens"]


def test_audio_visual_variant_trains_both_branches_and_scores_the_sounds(repo_root, tmp_path):
    """`tiny,audio_visual` at test size: clips with tones, both branches' glue trained on frames and fbank
    together, held-out captions scored on pitch and rhythm as well (the full-size run's numbers: README)."""
    import numpy as np

    workdir = tmp_path / "av"
    result = subprocess.run(
        ["vllama-train", "--config=configs/video_llama.py:tiny,audio_visual", f"--workdir={workdir}",
         "--config.data.synthetic_clips=16", "--config.data.synthetic_eval_clips=8", "--config.llm_pretraining.steps=10",
         "--config.train.steps=3", "--config.batch_size=4", "--config.eval.batch_size=4", "--config.eval.max_new_tokens=4"],
        cwd=repo_root, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(workdir / "data" / "train" / "annotations.csv") as f:
        assert " tone." in f.read()
    report = json.loads((workdir / "eval.json").read_text())
    assert report["clips"] == 8 and set(report["chance"]) == {"color", "shape", "motion", "pitch", "rhythm"}
    assert report["chance"]["pitch"] == report["chance"]["rhythm"] == 0.5
    assert "pitch" in result.stdout and np.isfinite(json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["loss"])
