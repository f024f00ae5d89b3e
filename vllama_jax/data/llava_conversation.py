"""Video-LLaVA's text: a LLaVA-style conversation turned into token ids and labels as the original's
`preprocess_multimodal` + `preprocess_v1` + `prepare_inputs_labels_for_multimodal` do it, at static shapes.

Templates (videollava/conversation.py), both separator style TWO, roles USER / ASSISTANT, sep " ", sep2 "</s>":
the text is system + " " + "USER: {q} ASSISTANT: {a}</s>" per round; an open last turn ends "ASSISTANT:".
- "conv_vicuna_v1" trains both stages (`--version v1`): "A chat between a curious user …the user's questions.";
- "llava_v1" is what evaluation and the CLI prompt with: "…a curious human …the human's questions.".

Quirks copied (each changes token ids or labels):
1. The two system strings differ by "user" / "human"; training and evaluation each use their own.
2. A `<video>` becomes num_frames `<image>`s in the text before tokenizing (so a video counts num_frames sentinel
   ids in every length below), and each is replaced by one frame's 257 features; `<image>` by the image's 256.
   The text is tokenised piece by piece between the tags (the original's `tokenizer_image_token`): each piece on
   its own, its [BOS] dropped, one sentinel id per tag, one [BOS] in front.
3. Labels: [BOS] masked; the text is split at "</s>" into rounds; in each, the part up to " ASSISTANT: " is masked
   for len(tokens(part)) − 2 tokens from the round's start and the cursor moves by len(tokens(round)): the −2
   and the round's own [BOS] standing in for its "</s>" are exact for LLaMA's tokenizer (the trailing space
   token merges into the answer), so the answers and their "</s>" are the labels. If the cursor does not land on
   the sequence's end, the whole row is masked (the original prints "tokenization mismatch"; we count it).
4. A first turn not from the human is dropped.
5. The spliced sequence (text + soft tokens) is cut at `max_length` (the original's tokenizer_model_max_length,
   3072), after the labels are made; soft tokens are never labels.

"Tokenised" means LLaMA's tokenizer, which puts [BOS] in front of every text by itself; a tokenizer that does not
(the small BPE of the tests) gets it put there (`conversation.tokenize`).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.data.conversation import tokenize


@dataclasses.dataclass(frozen=True)
class Template:
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"


TEMPLATES = {
    "conv_vicuna_v1": Template(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    "llava_v1": Template(
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    ),
}
IMAGE_TAG, VIDEO_TAG = "<image>", "<video>"
_FRAME_TAG = "<video frame>"  # ours: a video's frame, so that its sentinel says which tower fills it
# Sentinel ids before splicing: the original's IMAGE_TOKEN_INDEX, and ours for a video frame.
IMAGE_SENTINEL, FRAME_SENTINEL = -200, -201


def render(turns: list[dict], template: str, open_answer: bool = False) -> str:
    """The prompt text of LLaVA-format turns ({"from": "human" | "gpt", "value"}); `open_answer`: end with an
    open assistant turn ("… ASSISTANT:") for generation."""
    tpl = TEMPLATES[template]
    if turns and turns[0]["from"] != "human":
        turns = turns[1:]
    text = tpl.system + tpl.sep
    for i, turn in enumerate(turns):
        role = tpl.roles[i % 2]
        if turn["from"] != ("human", "gpt")[i % 2]:
            raise ValueError(f"turn {i} is from {turn['from']!r}: turns must alternate human, gpt")
        text += f"{role}: {turn['value']}" + (tpl.sep, tpl.sep2)[i % 2]
    if open_answer:
        text += f"{tpl.roles[1]}:"
    return text


def tokenize_with_media(tokenizer, text: str) -> list[int]:
    """Token ids with one sentinel per `<image>` / video frame, pieces between them tokenised on their own."""
    pieces = re.split(f"({re.escape(IMAGE_TAG)}|{re.escape(_FRAME_TAG)})", text)
    ids = [tokenizer.bos_token_id]
    for piece in pieces:
        if piece == IMAGE_TAG:
            ids.append(IMAGE_SENTINEL)
        elif piece == _FRAME_TAG:
            ids.append(FRAME_SENTINEL)
        else:
            ids.extend(tokenize(tokenizer, piece)[1:])
    return ids


def conversation_ids(tokenizer, turns: list[dict], num_frames: int, template: str = "conv_vicuna_v1",
                     model_max_length: int = 2048) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ids with sentinels, labels, matched) of a training conversation, before splicing; `matched` False when
    the label cursor missed the end (then every label is IGNORE_INDEX, as the original)."""
    turns = [dict(t, value=t["value"].replace(VIDEO_TAG, _FRAME_TAG * num_frames)) for t in turns]
    text = render(turns, template)
    ids = tokenize_with_media(tokenizer, text)
    labels = np.array(ids)
    tpl = TEMPLATES[template]
    answer_sep = tpl.sep + tpl.roles[1] + ": "
    cursor = 1
    labels[:cursor] = IGNORE_INDEX
    for round_text in text.split(tpl.sep2):
        parts = round_text.split(answer_sep)
        if round_text == "" or len(parts) != 2:
            break
        instruction = len(tokenize_with_media(tokenizer, parts[0] + answer_sep)) - 2
        labels[cursor:cursor + instruction] = IGNORE_INDEX
        cursor += len(tokenize_with_media(tokenizer, round_text))
    labels[cursor:] = IGNORE_INDEX
    matched = cursor >= model_max_length or cursor == len(ids)
    if not matched:
        labels[:] = IGNORE_INDEX
    return np.array(ids, np.int64), labels, matched


def prompt_ids(tokenizer, turns: list[dict], num_frames: int, template: str = "llava_v1") -> np.ndarray:
    """Ids (with sentinels) of a prompt for generation: the turns so far and an open assistant turn, as the
    original's evaluation and CLI build it (`llava_v1`)."""
    turns = [dict(t, value=t["value"].replace(VIDEO_TAG, _FRAME_TAG * num_frames)) for t in turns]
    return np.array(tokenize_with_media(tokenizer, render(turns, template, open_answer=True)), np.int64)


def splice_placeholders(ids: np.ndarray, labels: np.ndarray, *, image_tokens: int, frame_tokens: int,
                        image_token_id: int, video_token_id: int, max_length: int | None = 3072):
    """Each image sentinel -> image_tokens × image_token_id, each frame sentinel -> frame_tokens ×
    video_token_id (labels IGNORE_INDEX there), the result cut at max_length (None: not cut): what
    `models.video_llava` splices."""
    out_ids, out_labels = [], []
    for token, label in zip(ids.tolist(), labels.tolist()):
        if token in (IMAGE_SENTINEL, FRAME_SENTINEL):
            count, placeholder = (image_tokens, image_token_id) if token == IMAGE_SENTINEL else (
                frame_tokens, video_token_id)
            out_ids += [placeholder] * count
            out_labels += [IGNORE_INDEX] * count
        else:
            out_ids.append(token)
            out_labels.append(label)
    return np.array(out_ids[:max_length], np.int32), np.array(out_labels[:max_length], np.int32)
