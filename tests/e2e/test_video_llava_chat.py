"""`vllama-chat` with a Video-LLaVA config, as a subprocess: a parameter checkpoint of the tiny model, a tokenizer
directory and a real mp4 in, the greedy answer out as JSON, the same as answering in this process."""
import dataclasses
import json
import subprocess

import jax
import numpy as np

from vllama_jax.checkpoints import save_params
from vllama_jax.config import load_config, model_config
from vllama_jax.data import llava_video
from vllama_jax.data.synthetic import write_test_video
from vllama_jax.data.tokenizer import build_bpe_tokenizer, load_tokenizer
from vllama_jax.infer import llava_answer
from vllama_jax.infer.generate import DEMO
from vllama_jax.models.video_llava import VideoLlava, init_params
from vllama_jax.testing.jobs import environment

CONFIG = "configs/video_llava.py:llm=tiny"


def test_vllama_chat_answers_about_a_video(repo_root, tmp_path):
    cfg = model_config(load_config(str(repo_root / CONFIG)))
    model = VideoLlava(cfg)
    rng = np.random.default_rng(0)
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    params = jax.tree_util.tree_map(lambda b: (0.1 * rng.standard_normal(b.value.shape)).astype(b.value.dtype),
                                    abstract, is_leaf=lambda b: hasattr(b, "value"))
    save_params(tmp_path / "ckpt", params)
    build_bpe_tokenizer(["a red square moves left to right", "what moves in the video"] * 4,
                        vocab_size=300).save_pretrained(tmp_path / "tokenizer")
    video = write_test_video(tmp_path / "clip.mp4", num_frames=12, tone_hz=None)
    result = subprocess.run(
        ["vllama-chat", f"--config={CONFIG}", f"--config.data.tokenizer={tmp_path / 'tokenizer'}",
         f"--ckpt={tmp_path / 'ckpt'}", f"--video={video}", "--question=what moves", "--greedy",
         "--max_new_tokens=4"],
        cwd=repo_root, env=environment(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["template"] == "llava_v1" and [t["question"] for t in out["turns"]] == ["what moves"]
    tokenizer = load_tokenizer(tmp_path / "tokenizer")
    frames = llava_video.load_video(video, cfg.video_tower.num_frames, cfg.video_tower.image_size)
    gen = dataclasses.replace(DEMO, do_sample=False, max_new_tokens=4, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    expected = llava_answer.answer(model, params, tokenizer, "what moves", video=frames, cfg=gen)
    assert out["turns"][0]["answer"] == expected.text and out["turns"][0]["tokens"] == len(expected.tokens)
