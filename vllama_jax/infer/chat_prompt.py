"""The original demo's conversation at inference (video_llama/conversation/conversation_video.py, `Chat`):
how the prompt is written, tokenised around the media, stopped and cleaned up.

- Vicuna (`default_conversation`): system "" + "###" + "Human: {message}###" per user turn + "Assistant: {answer}###"
  per answer, and "Assistant:" for the slot being generated; stop at "###".
- LLaMA-2 (`conv_llava_llama_2`): "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{message} [/INST]" then
  " {answer} </s><s>[INST] {message} [/INST]" …; stop at EOS. With audio the demo sets the system to "" (copied).
- caption: not in the demo; stage 1's prompt ([BOS] + soft tokens, audio block first) for caption-pretrained
  models, which have never seen a template. Stops at the config's end_sym.

The media message is the demo's: "<Video><ImageHere></Video> " + the frame-time message, "<Image><ImageHere></Image> ",
or the audio-video message (data.text.AUDIO_VIDEO_MESSAGE); a question asked right after it joins it with a space.
The demo tokenises the prompt in segments split at each placeholder (BOS on the first segment only) and puts each
block of soft tokens between them; here the placeholder ids stand in the sequence, `n` of them per block, which
the model replaces one for one (Video-LLaMA.splice). The demo then cuts the prompt's embeddings to their last
max_length − max_new_tokens positions: `GenerationConfig.max_length` (generate.truncate_prompt) does that after
the splice, so a cut through a soft-token block keeps that block's last tokens, as the demo's does.
"""
from __future__ import annotations

import dataclasses
import re

from vllama_jax.constants import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER
from vllama_jax.data import conversation, text

TEMPLATE_NAMES = (*conversation.TEMPLATES, "caption")
LLAMA_2_SYSTEM = conversation.LLAMA_2_SYSTEM
ROLES = {**conversation.ROLES, "caption": ("", "")}


@dataclasses.dataclass
class Conversation:
    template: str
    system: str
    messages: list = dataclasses.field(default_factory=list)  # [role, text or None]
    with_audio: bool = False


def media_message(kind: str, seconds, with_audio: bool) -> str:
    """The first user message the demo's upload_video / upload_img writes (one placeholder per media block)."""
    if with_audio and kind != "image":
        return text.AUDIO_VIDEO_MESSAGE.format(audio=AUDIO_PLACEHOLDER, video=IMAGE_PLACEHOLDER)
    return text.media_prefix(kind, 1, seconds or None)


def new_conversation(template: str, kind: str, seconds, with_audio: bool) -> Conversation:
    if template not in TEMPLATE_NAMES:
        raise ValueError(f"unknown template {template!r}: expected one of {TEMPLATE_NAMES}")
    system = LLAMA_2_SYSTEM if template == "llama_2" and not with_audio else ""
    conv = Conversation(template, system, with_audio=with_audio)
    if template != "caption":
        conv.messages.append([ROLES[template][0], media_message(kind, seconds, with_audio)])
    return conv


def ask(conv: Conversation, question: str) -> None:
    """The demo's `ask`: joined to the media message when that is the last one, else a new user turn."""
    user = ROLES[conv.template][0]
    last = conv.messages[-1] if conv.messages else None
    if last is not None and last[0] == user and ("</Video>" in last[1] or "</Image>" in last[1]):
        last[1] = " ".join([last[1], question])
    else:
        conv.messages.append([user, question])


def record_answer(conv: Conversation, answer: str) -> None:
    if conv.template != "caption":
        conv.messages[-1][1] = answer


def render(conv: Conversation) -> str:
    """Conversation.get_prompt of the original, for the two styles the demo uses."""
    if conv.template == "vicuna":
        out = conv.system + "###"
        for role, message in conv.messages:
            out += f"{role}: {message}###" if message else f"{role}:"
        return out
    return conversation.llama_2_render([message for _, message in conv.messages], conv.system)


def segment_ids(tokenizer, prompt: str, counts: dict[str, int]) -> list[int]:
    """Tokenise `prompt` the demo's way: the text between placeholders one segment at a time, special tokens on
    the first only; each placeholder becomes `counts[placeholder]` placeholder ids."""
    pieces = re.split(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(AUDIO_PLACEHOLDER)})", prompt)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if piece in counts:
            ids += [tokenizer.convert_tokens_to_ids(piece)] * counts[piece]
        elif piece or i == 0:
            ids += tokenizer(piece, add_special_tokens=i == 0)["input_ids"]
    if not ids or ids[0] != tokenizer.bos_token_id:  # LLaMA's tokenizer adds BOS itself; a bare BPE may not
        ids = [tokenizer.bos_token_id] + ids
    return ids


def answer_prompt_ids(session, conv: Conversation, question: str) -> list[int]:
    """Add the question and the empty answer slot; the prompt's ids for generating the answer."""
    counts = session.placeholder_counts()
    if conv.template == "caption":  # stage 1: [BOS] (+ audio block) + video block
        prompt = (AUDIO_PLACEHOLDER if conv.with_audio else "") + IMAGE_PLACEHOLDER
        return segment_ids(session.tokenizer, prompt, counts)
    ask(conv, question)
    conv.messages.append([ROLES[conv.template][1], None])
    return segment_ids(session.tokenizer, render(conv), counts)


def first_turn_ids(
    session, question: str, seconds, with_audio: bool, kind: str = "video", template: str | None = None
) -> list[int]:
    """The prompt ids for one question about fresh media (vllama-caption --question)."""
    template = template or session.config.data.get("template", "vicuna")
    return answer_prompt_ids(session, new_conversation(template, kind, seconds, with_audio), question)


def stop_sequences(session, end: str | None, template: str | None = None) -> tuple[tuple[int, ...], ...]:
    """Token-id sequences that end an answer: the end_sym for captions, "###" for Vicuna (the demo stops on both
    of LLaMA's encodings of it, 835 and 2277 29937; here every encoding the tokenizer gives in the contexts an
    answer ends in), none for LLaMA-2 (EOS)."""
    template = template or session.config.data.get("template", "vicuna")
    stop = end if template == "caption" or end is not None else ("###" if template == "vicuna" else None)
    if not stop:
        return ()
    tok = session.tokenizer
    seqs = {tuple(tok(stop, add_special_tokens=False)["input_ids"])}
    for before in (" ", ".", "a"):  # the stop string glued to what precedes it
        glued = tok(before + stop, add_special_tokens=False)["input_ids"]
        alone = tok(before, add_special_tokens=False)["input_ids"]
        if glued[: len(alone)] == alone:
            seqs.add(tuple(glued[len(alone) :]))
    return tuple(sorted(s for s in seqs if s))


def cut_at_stop(template: str, generated: str, end: str | None) -> str:
    stop = end if template == "caption" else ("###" if template == "vicuna" else "</s>")
    return generated.split(stop)[0] if stop else generated


def answer_text(template: str, generated: str, end: str | None = None) -> str:
    """The demo's clean-up: cut at the stop string, drop a repeated role name, strip."""
    out = cut_at_stop(template, generated, end)
    if template != "caption":
        out = out.split(ROLES[template][1] + ":")[-1]
    return out.strip()
