"""Caption text for stage-1 training: BLIP's caption cleaner and the [BOS] + soft tokens + caption layout."""
from __future__ import annotations

import re

import numpy as np

from vllama_jax.constants import AUDIO_PLACEHOLDER, IGNORE_INDEX, IMAGE_PLACEHOLDER


def clean_caption(caption: str, max_words: int = 50) -> str:
    """BLIP's `pre_caption`: lower-case, `.!"()*#:;~` -> space, collapse whitespace runs, strip, cut to max_words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def caption_example(
    tokenizer,
    caption: str,
    *,
    num_soft_tokens: int,
    image_token_id: int,
    max_txt_len: int,
    end_sym: str = "\n",
    prompt: str | None = None,
    length: int | None = None,
) -> dict[str, np.ndarray]:
    """One training example as static-length arrays (input_ids, padding_mask, labels).

    Layout: [BOS] + prompt-before + `<ImageHere>` × num_soft_tokens + prompt-after + caption tokens, right-padded
    to `length` (default 1 + prompt + num_soft_tokens + max_txt_len). The caption is `caption + end_sym`
    tokenised without special tokens and cut to max_txt_len tokens. Labels are the caption tokens; BOS, prompt,
    soft-token and padding positions get IGNORE_INDEX. As in the original, caption tokens equal to the pad id
    are also ignored (the original masks by pad id after padding).
    """
    before, after = "", ""
    if prompt:
        if prompt.count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(f"prompt must hold exactly one <ImageHere>: {prompt!r}")
        before, after = prompt.split(IMAGE_PLACEHOLDER)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    head = [tokenizer.bos_token_id] + encode(before) + [image_token_id] * num_soft_tokens + encode(after)
    text = encode(caption + end_sym)[:max_txt_len]
    total = len(head) + max_txt_len if length is None else length
    if len(head) + len(text) > total:
        raise ValueError(f"example of {len(head) + len(text)} tokens does not fit length {total}")
    pad = tokenizer.pad_token_id
    ids = np.full(total, pad, np.int32)
    ids[: len(head)] = head
    ids[len(head): len(head) + len(text)] = text
    mask = np.zeros(total, bool)
    mask[: len(head) + len(text)] = True
    labels = np.full(total, IGNORE_INDEX, np.int32)
    labels[len(head): len(head) + len(text)] = [t if t != pad else IGNORE_INDEX for t in text]
    return {"input_ids": ids, "padding_mask": mask, "labels": labels}


def check_placeholders(input_ids: np.ndarray, image_token_id: int, num_soft_tokens: int) -> None:
    """Each row must hold exactly num_soft_tokens consecutive placeholders (the model's splice relies on it)."""
    for row, ids in enumerate(np.asarray(input_ids)):
        where = np.flatnonzero(ids == image_token_id)
        if len(where) != num_soft_tokens or (len(where) and where[-1] - where[0] != num_soft_tokens - 1):
            raise ValueError(
                f"row {row}: expected {num_soft_tokens} consecutive <ImageHere> tokens (id {image_token_id}), "
                f"found {len(where)}"
            )


# Vicuna-v0 style conversation layout used by Video-LLaMA's instruction data (SPEC §6). The exact token-for-token
# template rules (separator quirks, LLaMA-2 chat) belong to the conversation-template module; this layout trains
# on assistant turns only and masks everything else.
def media_prefix(kind: str, num_soft_tokens: int, frame_seconds: list[float] | None = None) -> str:
    """`<Video>` + `<ImageHere>` × n + `</Video> ` (images: `<Image>`), then for video the timestamp message."""
    tag = "Video" if kind == "video" else "Image"
    prefix = f"<{tag}>" + IMAGE_PLACEHOLDER * num_soft_tokens + f"</{tag}> "
    if kind == "video" and frame_seconds is not None:
        times = ", ".join(str(round(t, 1)) for t in frame_seconds)
        prefix += f"The video contains {len(frame_seconds)} frames sampled at {times} seconds. "
    return prefix


# The original audio-video demo's first user message (conversation_video.py, `upload_video` with audio): the
# audio block, then the video block. The runs of spaces come from a line continuation inside the original's
# string literal; copied as they are. The original marks both blocks with one `<ImageHere>` each and splits the
# prompt on it; here each block is its placeholder repeated (`<AudioHere>` for audio), so one token sequence
# carries both and the model splices each branch's soft tokens at its own placeholders.
_GAP = " " * 17
AUDIO_VIDEO_MESSAGE = (
    "Close your eyes, open your ears and you imagine only based on the sound that: {audio}." + _GAP
    + "Close your ears, open your eyes and you see that <Video>{video}</Video>. " + _GAP
    + "Now answer my question based on what you have just seen and heard."
)


def audio_video_message(num_audio_tokens: int, num_video_tokens: int) -> str:
    return AUDIO_VIDEO_MESSAGE.format(
        audio=AUDIO_PLACEHOLDER * num_audio_tokens, video=IMAGE_PLACEHOLDER * num_video_tokens
    )
