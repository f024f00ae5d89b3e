"""Stage 2's training text: a conversation turned into token ids and labels exactly as the original does it.

Two templates, from the original's instruct datasets (video_instruct_dataset.py, llava_instruct_dataset.py):

- "vicuna" (`preprocess`): "\\n\\n" (the empty system + "\\n\\n") + "###Human: {q}\\n###Assistant: {a}\\n" … + "###",
  tokenised whole with the tokenizer's special tokens ([BOS] first). The labels copy the ids and are masked by
  the lengths of the pieces tokenised one by one (header, then each turn), each length counting the [BOS] the
  tokenizer puts in front of every piece: the header's span is masked, and in each human turn everything but
  its first two tokens. Copied quirks: every piece's [BOS] is counted, so the masks drift one token right per
  turn; the first two tokens of each human turn stay labels; the closing "###" stays a label.
- "llama_2" (`preprocess_for_llama_v2`): system " ", the first user message wrapped in
  "<<SYS>>\\n \\n<</SYS>>\\n\\n", each round "<s>[INST] {q} [/INST] {a} </s>" and the leading "<s>" taken off by a
  character-set `lstrip("<s>")`; tokenised whole ("<s>"/"</s>" in the text become BOS/EOS). Labels: [BOS] masked,
  then per round (the text split at "</s>") the instruction masked for len(tokens("… [/INST] ")) − 2 tokens from the
  round's start, the cursor moving by len(tokens(round)). Copied quirks: the "− 2" leaves the instruction's last
  token a label; the round's "</s>" is a label; a first turn not from the human is dropped. The original also
  builds a header "<s>[INST] <<SYS>>\\n{system}\\n</SYS>>\\n\\n" (with the typo) but never uses it; neither do we.

Media: a video's placeholders go in front of the first question ("<Video>" + "<ImageHere>" × n + "</Video> " +
the frame-time message), an image's replace every "<image>" in the turns ("<Image>" + "<ImageHere>" × n +
"</Image>"), as the two datasets do. VideoChat's instruction field `i` is not used by the original; a "system"
turn (which vllama-prepare keeps from it) is skipped here too.

"Tokenised with special tokens" means LLaMA's tokenizer, which puts [BOS] in front of every text by itself; a
tokenizer that does not (the small BPE the tests and the tiny model build) gets the [BOS] put there, so the ids
and lengths are the ones LLaMA's would give.
"""
from __future__ import annotations

import numpy as np

from vllama_jax.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER
from vllama_jax.data import text

TEMPLATES = ("vicuna", "llama_2")
ROLES = {"vicuna": ("Human", "Assistant"), "llama_2": ("USER", "ASSISTANT")}
# the demo's LLaMA-2 system prompt (conv_llava_llama_2); training uses " " (llama_v2_video_conversation)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
IMAGE_TAG = "<image>"  # LLaVA's DEFAULT_IMAGE_TOKEN


def tokenize(tokenizer, s: str) -> list[int]:
    """`tokenizer(s).input_ids` as LLaMA's tokenizer gives it: special tokens on, [BOS] in front."""
    ids = tokenizer(s)["input_ids"]
    if not _adds_bos(tokenizer):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def _adds_bos(tokenizer) -> bool:
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def with_media(turns: list[dict[str, str]], media_kind: str | None, num_soft_tokens: int,
               frame_seconds: list[float] | None = None) -> list[dict[str, str]]:
    """The turns (human/gpt only) with the media placeholders where the original's datasets put them."""
    turns = [dict(t) for t in turns if t["from"] != "system"]
    if media_kind == "video":
        first = next((t for t in turns if t["from"] == "human"), None)
        if first is not None:
            first["value"] = text.media_prefix("video", num_soft_tokens, frame_seconds) + first["value"]
    elif media_kind == "image":
        block = "<Image>" + IMAGE_PLACEHOLDER * num_soft_tokens + "</Image>"
        for t in turns:
            t["value"] = t["value"].replace(IMAGE_TAG, block)
    return turns


def vicuna_ids_and_labels(tokenizer, turns: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    roles = dict(zip(("human", "gpt"), ROLES["vicuna"]))
    header = "" + "\n\n"  # the empty system + "\n\n"
    pieces = [f"###{roles.get(t['from'].lower(), 'unknown')}: {t['value']}\n" for t in turns]
    ids = tokenize(tokenizer, header + "".join(pieces) + "###")
    labels = list(ids)
    pad = tokenizer.pad_token_id

    def length(s):  # the original counts the tokens that are not the pad id (pad = unk)
        return sum(1 for i in tokenize(tokenizer, s) if i != pad)

    cursor = length(header)
    labels[:cursor] = [IGNORE_INDEX] * min(cursor, len(labels))
    for turn, piece in zip(turns, pieces):
        n = length(piece)
        if turn["from"].lower() == "human":
            start, end = min(cursor + 2, len(labels)), min(cursor + n, len(labels))
            labels[start:end] = [IGNORE_INDEX] * max(end - start, 0)
        cursor += n
    return ids, labels


def llama_2_render(messages: list[str | None], system: str) -> str:
    """The original's Conversation.get_prompt, LLaMA-2 style, the one builder training and the demo share:
    `messages` alternate user, assistant (an empty one, such as the slot being generated, is skipped); the first
    carries the system block; "<s>[INST] {user} [/INST]" and " {answer} </s>" per turn; the leading "<s>" taken
    off by the original's character-set `lstrip("<s>")` (the "[" of "[INST]" stops it)."""
    out = ""
    for i, message in enumerate(messages):
        if not message:
            continue
        if i == 0:
            message = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + message
        out += f"<s>[INST] {message} [/INST]" if i % 2 == 0 else f" {message} </s>"
    return out.lstrip("<s>")


def llama_2_prompt(turns: list[dict[str, str]], system: str = " ") -> str:
    """Training's LLaMA-2 prompt of a conversation of alternating turns (`llama_2_render`)."""
    if turns and turns[0]["from"] != "human":
        turns = turns[1:]  # "Skip the first one if it is not from human"
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise ValueError(f"llama_2 template: turn {i} is from {turn['from']!r}, expected {expected!r}")
    return llama_2_render([turn["value"] for turn in turns], system)


def caption_prompt_template(template: str) -> tuple[str, str]:
    """(prompt template with one "{}", end symbol) that stage 2 wraps an image-caption sample's prompt in
    (MiniGPT-4 style; the original's two stage-2 configs): Vicuna's "###Human: {} ###Assistant: " and "###", or
    LLaMA-2's first turn (system " ") followed by a space, and "</s>"."""
    if template == "vicuna":
        return "###Human: {} ###Assistant: ", "###"
    if template == "llama_2":
        return llama_2_render(["{}"], " ") + " ", "</s>"
    raise ValueError(f"unknown conversation template {template!r}: expected one of {TEMPLATES}")


def llama_2_ids_and_labels(tokenizer, turns: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    prompt = llama_2_prompt(turns)
    ids = tokenize(tokenizer, prompt)
    labels = list(ids)
    labels[:1] = [IGNORE_INDEX]
    cursor, sep = 1, "[/INST] "
    for round_text in prompt.split("</s>"):
        if round_text == "":
            break
        parts = round_text.split(sep)
        if len(parts) != 2:
            break
        round_len = len(tokenize(tokenizer, round_text))
        instruction_len = len(tokenize(tokenizer, parts[0] + sep)) - 2  # the original's "- 2" (its comment asks why)
        end = min(cursor + instruction_len, len(labels))
        labels[cursor:end] = [IGNORE_INDEX] * max(end - cursor, 0)
        cursor += round_len
    labels[cursor:] = [IGNORE_INDEX] * max(len(labels) - cursor, 0)
    return ids, labels


def training_example(tokenizer, turns: list[dict[str, str]], template: str, *, length: int,
                     media_kind: str | None = None, num_soft_tokens: int = 0,
                     frame_seconds: list[float] | None = None) -> dict[str, np.ndarray]:
    """One conversation as fixed-length arrays: ids right-padded with the pad id, the padding mask, labels
    (IGNORE_INDEX where no loss), and whether it was cut at `length`."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}: expected one of {TEMPLATES}")
    for t in turns:
        if t["from"] not in ("human", "gpt", "system"):
            raise ValueError(f"unknown conversation role {t['from']!r}: expected human, gpt or system")
    turns = with_media(turns, media_kind, num_soft_tokens, frame_seconds)
    make = vicuna_ids_and_labels if template == "vicuna" else llama_2_ids_and_labels
    ids, labels = make(tokenizer, turns)
    truncated = len(ids) > length
    ids, labels = ids[:length], labels[:length]
    out_ids = np.full(length, tokenizer.pad_token_id, np.int32)
    out_labels = np.full(length, IGNORE_INDEX, np.int32)
    out_ids[: len(ids)] = ids
    out_labels[: len(labels)] = labels
    mask = np.zeros(length, bool)
    mask[: len(ids)] = True
    return {"input_ids": out_ids, "padding_mask": mask, "labels": out_labels, "truncated": np.bool_(truncated)}
