"""Video-LLaMA's audio branch (`models/video_llama.py`, `equip_audio_branch`) against the original's
`encode_audioQformer` composed from the real ImageBind and transformers' Blip2QFormerModel; images as masked frames;
a real mp4's audio track to a caption loss; the audio-video prompt's two blocks."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.data import audio
from vllama_jax.data.synthetic import write_test_video
from vllama_jax.models.video_llama import AUDIO_TRAINABLE, VideoLlama, causal_lm_loss
from vllama_jax.testing import imagebind_reference as ib_ref
from vllama_jax.testing import torch_reference as ref
from vllama_jax.testing.torch_reference import report

AUDIO_PREFIXES = ib_ref.AUDIO_PREFIXES


@pytest.mark.parametrize("modality", ["audio", "vision"])
def test_audio_soft_tokens_match_the_original_branch(audio_model, modality):
    cfg, model, params, torch_branch = audio_model
    rng = np.random.default_rng(2)
    if modality == "audio":  # 8 fbank clips, as the original's (B, 8, 1, 128, 204)
        inputs = rng.standard_normal((2, 8, 1, 128, 204)).astype(np.float32)
        t_inputs = torch.from_numpy(inputs)
    else:  # the audio stages: 8 frames through ImageBind's vision tower
        inputs = rng.standard_normal((2, 8, 224, 224, 3)).astype(np.float32)
        t_inputs = torch.from_numpy(inputs).permute(0, 1, 4, 2, 3).contiguous()
    ours = model.apply({"params": params}, inputs, modality, method=VideoLlama.encode_audio)
    with torch.no_grad():
        theirs = torch_branch(t_inputs, modality).numpy()
    assert ours.shape == (2, 8, cfg.llm.hidden_size)
    report(f"audio soft tokens from {modality}", ref.max_abs(ours, theirs))


def test_an_image_batched_as_masked_frames_is_the_originals_one_frame_clip(audio_model):
    """The audio stages read an image through ImageBind's vision tower as the original's T = 1 clip (audio
    position 0, one embedding): batched as 4 copies with frame_mask [1, 0, 0, 0] it gives the same soft tokens."""
    cfg, model, params, torch_branch = audio_model
    image = np.random.default_rng(5).standard_normal((1, 1, 224, 224, 3)).astype(np.float32)
    copies, mask = np.repeat(image, 4, axis=1), np.array([[True, False, False, False]])
    with torch.no_grad():
        theirs = torch_branch(torch.from_numpy(image).permute(0, 1, 4, 2, 3).contiguous(), "vision").numpy()
    one = model.apply({"params": params}, image, "vision", method=VideoLlama.encode_audio)
    masked = model.apply({"params": params}, copies, "vision", frame_mask=mask, method=VideoLlama.encode_audio)
    unmasked = model.apply({"params": params}, copies, "vision", method=VideoLlama.encode_audio)
    assert ref.max_abs(masked, one) <= 1e-6
    report("audio soft tokens of an image as 4 masked frames vs the original's 1 frame", ref.max_abs(masked, theirs))
    assert ref.max_abs(unmasked, one) > 1e-4  # without the mask the copies (and their positions) count
    # the training path: frames to the audio branch with the batch's frame_mask (VideoLlama.encode routes it)
    soft = model.apply({"params": params}, None, copies, "vision", frame_mask=mask, method=VideoLlama.encode)
    np.testing.assert_array_equal(soft["audio"], masked)


def test_real_mp4_audio_track_to_caption_loss(audio_model, tmp_path):
    """A generated mp4 with an AAC tone → fbank clips → ImageBind audio tower → audio Q-Former → soft tokens at
    the `<AudioHere>` tokens → LLM loss; gradients reach the audio glue and only it."""
    cfg, model, params, _ = audio_model
    path = write_test_video(tmp_path / "tone.mp4", num_frames=40, fps=8, tone_hz=660.0)
    clips, has_audio = audio.load_audio_clips(path, clips_per_video=8)
    assert has_audio and clips.shape == (8, 1, 128, 204)
    ids = np.array([[1, *[cfg.audio_token_id] * 8, 20, 21, 22, 23, 2]], np.int32)
    labels = np.where(np.arange(ids.shape[1]) > 8, ids, IGNORE_INDEX)
    trainable = {k: params[k] for k in AUDIO_TRAINABLE}
    frozen = {k: v for k, v in params.items() if k not in AUDIO_TRAINABLE}

    def loss_fn(trainable, fbank):
        logits, soft = model.apply({"params": {**frozen, **trainable}}, None, ids, audio=fbank)
        return causal_lm_loss(logits, labels)[0], soft

    (loss, soft), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, clips[None])
    assert np.isfinite(float(loss)) and set(soft) == {"audio"} and soft["audio"].shape == (1, 8, cfg.llm.hidden_size)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))
    silent, _ = loss_fn(trainable, np.zeros_like(clips)[None])
    assert abs(float(silent) - float(loss)) > 1e-6  # the sound reaches the loss


def test_audio_visual_prompt_carries_both_blocks_in_the_original_order(audio_model, tokenizer):
    """The original audio-video demo's message (audio block, then `<Video>` block) with both branches' soft tokens:
    each placeholder run receives its own branch's tokens, in order; audio-only and video-only inputs work too."""
    from vllama_jax.data import text

    cfg, model, params, _ = audio_model
    cfg = dataclasses.replace(cfg, image_token_id=tokenizer.convert_tokens_to_ids("<ImageHere>"),
                              audio_token_id=tokenizer.convert_tokens_to_ids("<AudioHere>"))
    model = VideoLlama(cfg)
    message = text.audio_video_message(cfg.num_audio_query_tokens, cfg.num_video_query_tokens)
    assert message.index("<AudioHere>") < message.index("<Video><ImageHere>")
    ids = np.array([[tokenizer.bos_token_id] + tokenizer(message, add_special_tokens=False)["input_ids"]], np.int32)
    assert (ids == cfg.audio_token_id).sum() == 8 and (ids == cfg.image_token_id).sum() == cfg.num_video_query_tokens
    rng = np.random.default_rng(3)
    frames = rng.standard_normal((1, 2, 28, 28, 3)).astype(np.float32)
    fbank = rng.standard_normal((1, 8, 1, 128, 204)).astype(np.float32)
    soft = model.apply({"params": params}, frames, fbank, method=VideoLlama.encode)
    embeds = np.asarray(model.apply({"params": params}, ids, soft["video"], soft["audio"], method=VideoLlama.splice))
    np.testing.assert_array_equal(embeds[0, ids[0] == cfg.audio_token_id], soft["audio"][0])
    np.testing.assert_array_equal(embeds[0, ids[0] == cfg.image_token_id], soft["video"][0])
    both, _ = model.apply({"params": params}, frames, ids, audio=fbank)
    video_only, _ = model.apply({"params": params}, frames, ids)
    assert both.shape == video_only.shape and not np.allclose(both, video_only)
    # audio only: a prompt with the audio block alone (no <ImageHere>, no frames), and the logits hear the sound
    heard_text = tokenizer(" the cat sat on the mat", add_special_tokens=False)["input_ids"]
    audio_ids = np.array(
        [[tokenizer.bos_token_id, *[cfg.audio_token_id] * cfg.num_audio_query_tokens, *heard_text]], np.int32
    )
    assert not (audio_ids == cfg.image_token_id).any()
    audio_only, soft_only = model.apply({"params": params}, None, audio_ids, audio=fbank)
    silent, _ = model.apply({"params": params}, None, audio_ids, audio=np.zeros_like(fbank))
    assert set(soft_only) == {"audio"} and audio_only.shape == (1, audio_ids.shape[1], cfg.llm.vocab_size)
    moved = np.abs(np.asarray(audio_only) - np.asarray(silent)).max(axis=-1)[0]
    assert moved[0] == 0 and (moved[1:] > 1e-4).all()  # causal: from the first audio token on, every position
    image = model.apply({"params": params}, frames[:, :1], method=VideoLlama.encode_video)  # an image: one frame
    assert image.shape == (1, cfg.num_video_query_tokens, cfg.llm.hidden_size)
