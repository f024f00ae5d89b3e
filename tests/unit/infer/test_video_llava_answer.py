"""Answering with Video-LLaVA (`infer/llava_answer.py`): the evaluation prompt around a real mp4's frames, and
cached greedy decoding that agrees with the full forward pass token by token (tiny random model); an image too."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vllama_jax.config import load_config, model_config
from vllama_jax.data import llava_video
from vllama_jax.data.synthetic import write_test_image, write_test_video
from vllama_jax.infer import llava_answer
from vllama_jax.infer.generate import GenerationConfig
from vllama_jax.models.video_llava import VideoLlava, init_params


def test_a_video_question_is_answered_as_the_full_forward_pass_would(repo_root, tokenizer, tmp_path):
    cfg = model_config(load_config(str(repo_root / "configs/video_llava.py:llm=tiny")))
    model = VideoLlava(cfg)
    rng = np.random.default_rng(0)
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    params = jax.tree_util.tree_map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype),
                                    jax.tree_util.tree_map(lambda b: b.value, abstract,
                                                           is_leaf=lambda b: hasattr(b, "value")))
    path = write_test_video(tmp_path / "clip.mp4", num_frames=12, tone_hz=None)
    frames = llava_video.load_video(path, num_frames=cfg.video_tower.num_frames, size=cfg.video_tower.image_size)
    gen = GenerationConfig(max_new_tokens=5, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    text, tokens, ids = llava_answer.answer(model, params, tokenizer, "what moves", video=frames, cfg=gen)
    assert ids[0, 0] == tokenizer.bos_token_id and (ids == cfg.video_token_id).sum() == cfg.video_tokens
    assert "human's questions. USER:" in tokenizer.decode(ids[0][ids[0] < 500])
    assert 1 <= len(tokens) <= 5 and text == tokenizer.decode(tokens, skip_special_tokens=True)
    full = np.concatenate([ids, np.asarray(tokens, ids.dtype)[None, :-1]], axis=1)
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x, videos=jnp.asarray(frames)[None]))(params, full)
    np.testing.assert_array_equal(np.argmax(np.asarray(logits[0, ids.shape[1] - 1:]), -1), tokens)
    image = llava_video.load_image(write_test_image(tmp_path / "cat.jpg"), size=cfg.image_tower.image_size)
    text, tokens, ids = llava_answer.answer(model, params, tokenizer, "what is it", image=image, cfg=gen)
    assert (ids == cfg.image_token_id).sum() == cfg.image_tokens and 1 <= len(tokens) <= 5
    with pytest.raises(ValueError, match="exactly one of video and image"):
        llava_answer.prompt(model, tokenizer, "?", video=frames, image=frames[0])
