"""Caption layout, the caption cleaner, the tokenizer helpers and PyAV frame decoding on a real mp4."""
import numpy as np
import pytest

from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.data import text, video
from vllama_jax.data.synthetic import write_test_video


def test_clean_caption():
    assert text.clean_caption('  A Dog (running)!  on the beach: "fast"... ') == "a dog running on the beach fast"
    assert text.clean_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)


def test_placeholders_and_pad(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<ImageHere>")
    audio_id = tokenizer.convert_tokens_to_ids("<AudioHere>")
    assert (image_id, audio_id) == (len(tokenizer) - 2, len(tokenizer) - 1)
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == 0
    assert tokenizer("x <ImageHere> y", add_special_tokens=False)["input_ids"].count(image_id) == 1


def test_caption_example_layout(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<ImageHere>")
    ex = text.caption_example(tokenizer, "a red square", num_soft_tokens=4, image_token_id=image_id, max_txt_len=8)
    caption_ids = tokenizer("a red square\n", add_special_tokens=False)["input_ids"]
    n = len(caption_ids)
    assert ex["input_ids"].shape == (1 + 4 + 8,)
    assert ex["input_ids"][0] == tokenizer.bos_token_id
    assert list(ex["input_ids"][1:5]) == [image_id] * 4
    assert list(ex["input_ids"][5:5 + n]) == caption_ids
    assert list(ex["labels"][:5]) == [IGNORE_INDEX] * 5 and list(ex["labels"][5:5 + n]) == caption_ids
    assert (ex["labels"][5 + n:] == IGNORE_INDEX).all() and ex["padding_mask"].sum() == 5 + n
    # truncation to max_txt_len tokens, end symbol included before cutting
    short = text.caption_example(tokenizer, "a red square", num_soft_tokens=4, image_token_id=image_id, max_txt_len=2)
    assert list(short["labels"][5:]) == caption_ids[:2]
    # a prompt wraps the placeholders; its tokens are not trained on
    wrapped = text.caption_example(
        tokenizer, "a cat", num_soft_tokens=4, image_token_id=image_id, max_txt_len=8, prompt="the <ImageHere> mat", length=24
    )
    first_label = np.flatnonzero(wrapped["labels"] != IGNORE_INDEX)[0]
    assert wrapped["input_ids"][first_label - 1] != image_id  # " mat" tokens sit between soft tokens and caption
    text.check_placeholders(wrapped["input_ids"][None], image_id, 4)
    with pytest.raises(ValueError, match="row 0: expected 5"):
        text.check_placeholders(wrapped["input_ids"][None], image_id, 5)


def test_frame_indices():
    assert list(video.frame_indices(24, 8)) == [0, 3, 6, 9, 12, 15, 18, 21]
    assert list(video.frame_indices(10, 8)) == [0, 1, 2, 3, 5, 6, 7, 8]  # arange(0, 10, 1.25) cast to int
    ht = video.frame_indices(20, 8, "headtail", np.random.default_rng(0))
    assert len(ht) == 8 and (ht[:4] < 10).all() and (ht[4:] >= 10).all() and (np.diff(ht[:4]) > 0).all()


def test_decode_real_mp4(tmp_path):
    path = write_test_video(tmp_path / "clip.mp4", num_frames=16, size=(64, 48), fps=8)
    assert video.count_frames(path) == 16
    frames, fps = video.read_frames(path, [0, 15], 28)
    assert frames.shape == (2, 28, 28, 3) and fps == 8.0
    # the red square moves from the left edge to the right edge
    red = frames[..., 0].astype(int) - frames[..., 2].astype(int)
    cols = [np.flatnonzero(r.max(axis=0) > 100).mean() for r in red]
    assert cols[0] < 10 < 18 < cols[1]
    x = video.load_video(path, 8, 28)
    assert x.shape == (8, 28, 28, 3) and x.dtype == np.float32
    np.testing.assert_allclose(video.normalize(np.full((1, 1, 1, 3), 255, np.uint8))[0, 0, 0],
                               (1 - np.array(video.CLIP_MEAN)) / np.array(video.CLIP_STD), rtol=1e-6)
    with pytest.raises(ValueError, match="past the end"):
        video.read_frames(path, [99], 28)


def test_unreadable_video_names_the_file(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(Exception, match="broken.mp4"):
        video.read_frames(bad, [0], 28)
