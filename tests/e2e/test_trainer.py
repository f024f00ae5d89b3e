"""`vllama-train` on the CPU demo at test size: exact resume after SIGKILL, SIGTERM saves and exits 0 (also during
start-up), frozen stays frozen, `keep` prunes, a half-written checkpoint is not resumed, too many non-finite steps
stop."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import pytest

from vllama_jax.testing.jobs import (
    SMALL_WORLD,
    checkpoint_steps,
    copy_world,
    environment,
    losses,
    override_args,
    restore_state,
)

STEPS = 150


# the CPU demo at test size (its world made once per session: conftest.small_world), no held-out captioning
SMALL = {"batch_size": 2, **SMALL_WORLD, "eval.at_end": False}
SMALL_ARGS = override_args(SMALL)


def command(workdir, *overrides, steps=STEPS):
    return [
        "vllama-train",
        "--config=configs/tiny_shapes.py",
        f"--workdir={workdir}",
        *SMALL_ARGS,
        f"--config.train.steps={steps}",
        "--config.train.checkpoint_every=4",
        "--config.train.log_every=1000",
        *overrides,
    ]


def run(workdir, repo_root, *overrides, steps=STEPS, returncode=0):
    result = subprocess.run(
        command(workdir, *overrides, steps=steps),
        cwd=repo_root,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == returncode, result.stderr[-3000:]
    return result


def interrupt(workdir, repo_root, sig, after_step=9):
    """Start a run and send `sig` once it has logged `after_step` steps; returns the exit code."""
    proc = subprocess.Popen(
        command(workdir), cwd=repo_root, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
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
def synthetic(small_world):
    """The directory of the session's small world (data, tokenizer, frozen checkpoint)."""
    return small_world[1]


@pytest.fixture(scope="module")
def uninterrupted_run(repo_root, tmp_path_factory, synthetic):
    workdir = copy_world(synthetic, tmp_path_factory.mktemp("uninterrupted"))
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


def test_frozen_checkpoint_is_read_not_rewritten(uninterrupted_run, synthetic):
    """150 steps later the run's frozen/ directory is the one it was given, file for file, byte for byte, and
    untouched (copytree kept the original's modification times)."""
    given, used = synthetic / "frozen", uninterrupted_run / "frozen"
    files = sorted(p.relative_to(given) for p in given.rglob("*") if p.is_file())
    assert len(files) > 3 and files == sorted(p.relative_to(used) for p in used.rglob("*") if p.is_file())
    for name in files:
        assert (used / name).read_bytes() == (given / name).read_bytes(), name
        assert (used / name).stat().st_mtime_ns == (given / name).stat().st_mtime_ns, name


def test_keep_prunes_to_the_newest_checkpoints(uninterrupted_run):
    # 38 saves (every 4 steps and the last), train.keep = 3 newest kept
    assert checkpoint_steps(uninterrupted_run) == ([144, 148, 150], [])


def test_half_written_checkpoint_is_never_resumed(repo_root, tmp_path, uninterrupted_run, uninterrupted):
    """A save killed before orbax's final rename leaves `<step>.orbax-checkpoint-tmp`: the restarted run resumes
    from the newest complete step before it, removes it, and recomputes the same losses."""
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted_run, workdir)
    (workdir / "checkpoints" / "150").rename(workdir / "checkpoints" / "150.orbax-checkpoint-tmp")
    result = run(workdir, repo_root)
    assert "resumed from step 148" in result.stdout
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == STEPS + 2  # steps 149 and 150 again
    assert losses(workdir) == uninterrupted
    assert checkpoint_steps(workdir) == ([144, 148, 150], [])


def test_too_many_nonfinite_steps_stop_the_run_with_the_last_good_weights(repo_root, tmp_path, uninterrupted_run):
    """From the finished run's step 150, ten more steps with a NaN RMSNorm eps (every loss NaN) and
    max_nonfinite=2: two skipped steps are tolerated, the third stops the run with exit status 1 and a checkpoint
    whose weights are step 150's (skipped updates leave them unchanged)."""
    import numpy as np

    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted_run, workdir)
    result = run(
        workdir,
        repo_root,
        "--config.train.max_nonfinite=2",
        "--config.model.llm.rms_norm_eps=nan",
        steps=STEPS + 10,
        returncode=1,
    )
    assert "stopped: 3 non-finite steps (max_nonfinite=2)" in result.stdout, result.stdout[-2000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()][STEPS:]
    assert [(r["step"], r["finite"]) for r in records] == [(151, False), (152, False), (153, False)]
    assert checkpoint_steps(workdir) == ([150, 152, 153], [])  # every 4 steps, and where it stopped
    stopped, last_good = restore_state(workdir, 153), restore_state(workdir, 150)
    assert int(stopped["step"]) == 153 and int(stopped["skipped"]) == 3
    for a, b in zip(
        jax.tree_util.tree_leaves(last_good["trainable"]), jax.tree_util.tree_leaves(stopped["trainable"]), strict=True
    ):
        np.testing.assert_array_equal(b, a)


def test_sigterm_during_startup_exits_zero(repo_root, tmp_path, synthetic):
    """SIGTERM right after the run's first line (before its data, weights and compilation): it stops before
    compiling, with exit status 0 and nothing saved."""
    copy_world(synthetic, tmp_path)
    proc = subprocess.Popen(
        command(tmp_path),
        cwd=repo_root,
        env={**environment(), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert first.startswith("training "), first + out + err[-2000:]
    assert proc.returncode == 0, err[-3000:]
    assert "preempted" in out and "step 1:" not in out
    assert not (tmp_path / "metrics.jsonl").exists() and checkpoint_steps(tmp_path) == ([], [])


def test_sigkill_then_resume_reproduces_the_losses_bitwise(repo_root, tmp_path, synthetic, uninterrupted):
    copy_world(synthetic, tmp_path)
    code = interrupt(tmp_path, repo_root, signal.SIGKILL)
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = max(losses(tmp_path))
    assert killed_at < STEPS
    result = run(tmp_path, repo_root)
    assert "resumed from step" in result.stdout + result.stderr
    assert losses(tmp_path) == uninterrupted  # every step, bit for bit (json keeps the full float)


def test_sigterm_saves_at_the_step_boundary_and_exits_zero(repo_root, tmp_path, synthetic, uninterrupted):
    copy_world(synthetic, tmp_path)
    code = interrupt(tmp_path, repo_root, signal.SIGTERM)
    assert code == 0
    stopped_at = max(losses(tmp_path))
    assert stopped_at < STEPS
    assert str(stopped_at) in os.listdir(tmp_path / "checkpoints")  # saved where it stopped, not at a multiple of 4
    run(tmp_path, repo_root)
    assert losses(tmp_path) == uninterrupted


def test_stage2_recipe_starts_from_stage1_weights_on_instruction_shards(
    repo_root, tmp_path, synthetic, uninterrupted_run
):
    """`llm=tiny,recipe=vision_stage2` on LLaVA-format conversation shards (real JPEGs through vllama-prepare), its
    trainable weights taken from the stage-1 run, its frozen ones from the frozen checkpoint."""
    import numpy as np

    from vllama_jax.data.prepare import prepare
    from vllama_jax.data.synthetic import SYNTHETIC_COLORS, write_test_image

    media = tmp_path / "images"
    media.mkdir()
    annotations = []
    for i, (name, rgb) in enumerate(SYNTHETIC_COLORS.items()):
        write_test_image(media / f"{i}.jpg", color=rgb)
        annotations.append(
            {
                "id": str(i),
                "image": f"{i}.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the left half?"},
                    {"from": "gpt", "value": f"It is {name}."},
                    {"from": "human", "value": "And the right half?"},
                    {"from": "gpt", "value": "Black."},
                ],
            }
        )
    (tmp_path / "llava.json").write_text(json.dumps(annotations))
    prepare("llava_instruct", tmp_path / "llava.json", media, tmp_path / "shards", name="llava", log=lambda *_: None)
    # and cc_sbu_align-style captions of the same images, read with stage 2's alignment prompts
    captions = {
        "annotations": [
            {"image_id": str(i), "caption": f"The left half is {name}."} for i, name in enumerate(SYNTHETIC_COLORS)
        ]
    }
    (tmp_path / "cc_sbu_align.json").write_text(json.dumps(captions))
    prepare(
        "image_caption",
        tmp_path / "cc_sbu_align.json",
        media,
        tmp_path / "captions",
        name="cc_sbu",
        log=lambda *_: None,
    )

    workdir = tmp_path / "stage2"
    result = subprocess.run(
        [
            "vllama-train",
            "--config=configs/video_llama.py:llm=tiny,recipe=vision_stage2",
            f"--workdir={workdir}",
            f"--config.data.shards={tmp_path / 'shards'},{tmp_path / 'captions'}",
            f"--config.data.tokenizer={synthetic / 'tokenizer'}",
            f"--config.train.frozen_checkpoint={synthetic / 'frozen'}",
            f"--config.train.init_trainable={uninterrupted_run}",
            "--config.train.steps=2",
            "--config.batch_size=4",
            # the frozen checkpoint is the demo's, whose ViT is twice llm=tiny's width (configs/tiny_shapes.py)
            "--config.model.vision.width=96",
            "--config.model.vision.mlp_dim=192",
            "--config.model.qformer.encoder_width=96",
        ],  # one pass over the 2 × 4 samples
        cwd=repo_root,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"trainable weights from {uninterrupted_run}" in result.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["examples"] == 4 and r["tokens"] > 0 and np.isfinite(r["loss"]) for r in records)
    assert records[0]["learning_rate"] == pytest.approx(1e-6)  # stage 2's warmup start

    before, after = restore_state(uninterrupted_run, STEPS)["trainable"], restore_state(workdir, 2)["trainable"]
    changed = 0
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_allclose(b, a, atol=1e-5)  # two AdamW steps at lr ~1e-6 move a weight by ~2e-6
        changed += int(not np.array_equal(a, b))
    assert changed > 0


@pytest.mark.parametrize("audio_source", ["frames", "fbank"])
def test_audio_stage1_trains_only_the_audio_glue(repo_root, tmp_path, synthetic, audio_source):
    """`llm=tiny,recipe=audio_stage1` on WebVid-format shards of mp4s with tones: "frames" feeds the video
    frames through ImageBind's vision tower (the paper's audio stages), "fbank" the clips' audio track; only the audio
    Q-Former, its queries, its position embedding and audio_llama_proj are in the train state."""
    import numpy as np

    from vllama_jax.data.prepare import prepare
    from vllama_jax.data.synthetic import write_test_video

    media = tmp_path / "media" / "tones"
    media.mkdir(parents=True)
    rows = ["videoid,name,page_dir"]
    for i, (hz, words) in enumerate(
        [(330.0, "a low tone"), (660.0, "a middle tone"), (1320.0, "a high tone"), (990.0, "a bright tone")]
    ):
        write_test_video(media / f"{i}.mp4", num_frames=24, fps=8, tone_hz=hz)
        rows.append(f"{i},{words},tones")
    (tmp_path / "tones.csv").write_text("\n".join(rows) + "\n")
    prepare(
        "webvid", tmp_path / "tones.csv", tmp_path / "media", tmp_path / "shards", name="tones", log=lambda *_: None
    )

    workdir = tmp_path / "audio_stage1"
    result = subprocess.run(
        [
            "vllama-train",
            "--config=configs/video_llama.py:llm=tiny,recipe=audio_stage1",
            f"--workdir={workdir}",
            f"--config.data.shards={tmp_path / 'shards'}",
            f"--config.data.tokenizer={synthetic / 'tokenizer'}",
            f"--config.data.audio_source={audio_source}",
            "--config.train.steps=2",
            "--config.batch_size=2",
            "--config.eval.at_end=False",
        ],
        cwd=repo_root,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parameters: 30,400 trainable" in result.stdout, result.stdout  # the tiny audio glue
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["loss"]) and r["examples"] == 2 for r in records)
    assert sorted(restore_state(workdir, 2)["trainable"]) == [
        "audio_Qformer",
        "audio_llama_proj",
        "audio_position_embedding",
        "audio_query_tokens",
    ]


def test_audio_visual_variant_trains_both_branches_and_scores_the_sounds(repo_root, tmp_path):
    """`tiny_shapes.py:variant=audio_visual` at test size: clips with tones, both branches' glue trained on frames and
    fbank together, held-out captions scored on pitch and rhythm as well (the full-size run's numbers:
    docs/results.md)."""
    import numpy as np

    workdir = tmp_path / "av"
    result = subprocess.run(
        [
            "vllama-train",
            "--config=configs/tiny_shapes.py:variant=audio_visual",
            f"--workdir={workdir}",
            "--config.data.synthetic_clips=16",
            "--config.data.synthetic_eval_clips=8",
            "--config.llm_pretraining.steps=10",
            "--config.train.steps=3",
            "--config.batch_size=4",
            "--config.eval.batch_size=4",
            "--config.eval.max_new_tokens=4",
        ],
        cwd=repo_root,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(workdir / "data" / "train" / "annotations.csv") as f:
        assert " tone." in f.read()
    report = json.loads((workdir / "eval.json").read_text())
    assert report["clips"] == 8 and set(report["chance"]) == {"color", "shape", "motion", "pitch", "rhythm"}
    assert report["chance"]["pitch"] == report["chance"]["rhythm"] == 0.5
    assert "pitch" in result.stdout and np.isfinite(
        json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    )
