"""`vllama-chat`: talk to a trained Video-LLaMA about a video (and its sound) or an image, in the terminal.

    vllama-chat --config configs/tiny_shapes.py --ckpt runs/tiny --video clip.mp4            # interactive
    vllama-chat --config ... --ckpt ... --video clip.mp4 --audio --question "What do you hear?"   # one JSON answer
    vllama-chat --config configs/video_llava.py:llm=vicuna_7b --config.data.tokenizer=vicuna-7b-v1.5 \
        --ckpt ckpt/vllava --video clip.mp4 --question "What happens?" --greedy      # Video-LLaVA

A Video-LLaVA config answers each --question about the --video (or --image) on its own, with the original's evaluation
prompt (llava_v1), from a parameter checkpoint of the whole model (`vllama-convert import`'s output).

Interactive mode streams the answer token by token; `/reset` starts the conversation again (same media),
`/quit` or end of input leaves. With --question (repeatable, asked in order as one conversation) it prints one
JSON object: the answers, token counts and timings. The conversation follows the config's template
(`data.template`: the original Vicuna `###` or LLaMA-2 `[INST]` format) or `--template caption` for a
stage-1 model (its prompt is [BOS] + soft tokens, as in caption pretraining). Generation defaults are the
original demo's (sampling, top-p 0.9, temperature 1, 300 new tokens); `--greedy` and `--num_beams` change it.
As in the demo, a conversation longer than --max_length − --max_new_tokens tokens (2000 − 300) is cut to its
last that many positions, with a warning: the model no longer sees its beginning (the media included).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vllama_jax.config import require_family
from vllama_jax.data.media import audio_clips, image_frames, video_frames
from vllama_jax.infer import chat_prompt
from vllama_jax.infer.generate import DEMO, context_start
from vllama_jax.infer.session import Session, decode_tokens, load_session

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_shapes.py", "model / data / mesh config")
_CKPT = flags.DEFINE_string("ckpt", None, "a vllama-train run directory (or a trainable-parameter checkpoint)")
_VIDEO = flags.DEFINE_string("video", None, "the video to talk about")
_IMAGE = flags.DEFINE_string("image", None, "an image to talk about (instead of a video)")
_AUDIO = flags.DEFINE_bool("audio", False, "also listen to the video's audio track (the audio-video prompt)")
_QUESTION = flags.DEFINE_multi_string("question", None, "ask non-interactively and print JSON (repeat for more turns)")
_TEMPLATE = flags.DEFINE_string("template", None, "vicuna | llama_2 | caption (default: the config's data.template)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", DEMO.max_new_tokens, "tokens per answer at most")
_GREEDY = flags.DEFINE_bool("greedy", False, "greedy decoding instead of the demo's sampling")
_BEAMS = flags.DEFINE_integer("num_beams", DEMO.num_beams, "beam search width")
_TEMPERATURE = flags.DEFINE_float("temperature", DEMO.temperature, "sampling temperature")
_TOP_P = flags.DEFINE_float("top_p", DEMO.top_p, "nucleus sampling mass")
_TOP_K = flags.DEFINE_integer("top_k", DEMO.top_k, "sample among the k likeliest tokens (0 = all)")
_REPETITION = flags.DEFINE_float("repetition_penalty", DEMO.repetition_penalty, "transformers' repetition penalty")
_MAX_LENGTH = flags.DEFINE_integer("max_length", DEMO.max_length,
                                   "prompt + answer tokens at most; a longer conversation loses its beginning")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")


class Chat:
    """One conversation about one piece of media: the media are encoded once per answer with the prompt."""

    def __init__(self, session: Session, template: str, kind: str, frames, seconds, clips, gen_overrides: dict,
                 seed: int):
        self.session, self.template, self.kind = session, template, kind
        self.frames, self.seconds, self.clips = frames, seconds, clips
        self.cfg = session.generation_config(**gen_overrides)
        self.rng = jax.random.key(seed)
        self.reset()

    def reset(self):
        self.conversation = chat_prompt.new_conversation(self.template, self.kind, self.seconds, self.clips is not None)

    def _prompt(self, question: str):
        ids = chat_prompt.answer_prompt_ids(self.session, self.conversation, question)
        ids = np.asarray(ids, np.int32)[None]
        if context_start(ids.shape[1], self.cfg):  # the demo's warning; generation drops those positions
            logging.warning("The number of tokens in the current conversation (%d) exceeds max_length %d minus "
                            "max_new_tokens %d: the model will not see the context outside the range.",
                            ids.shape[1], self.cfg.max_length, self.cfg.max_new_tokens)
        return ids, np.ones_like(ids, bool)

    def _cfg(self):
        end = self.session.config.data.end_sym if self.template == "caption" else None
        stops = chat_prompt.stop_sequences(self.session, end, self.template)
        return dataclasses.replace(self.cfg, stop_sequences=stops), end

    def ask(self, question: str) -> dict:
        """Answer at once (jitted while-loop, or beam search)."""
        ids, mask = self._prompt(question)
        cfg, end = self._cfg()
        self.rng, key = jax.random.split(self.rng)
        started = time.perf_counter()
        out = jax.device_get(self.session.generate(ids, mask, self.frames[None],
                                                   None if self.clips is None else self.clips[None], cfg, key))
        seconds = time.perf_counter() - started
        length = int(out.lengths[0])
        answer = chat_prompt.answer_text(
            self.template, decode_tokens(self.session.tokenizer, out.tokens[0], length), end
        )
        chat_prompt.record_answer(self.conversation, answer)
        return {
            "question": question,
            "answer": answer,
            "prompt_tokens": int(ids.shape[1]),
            "dropped_prompt_tokens": context_start(ids.shape[1], cfg),
            "new_tokens": length,
            "seconds": round(seconds, 3),
        }

    def ask_streaming(self, question: str, write=sys.stdout.write) -> str:
        """Answer token by token, writing the text as it grows; returns the post-processed answer."""
        cfg, end = self._cfg()
        if cfg.num_beams > 1:  # beams cannot stream: their best hypothesis is known only at the end
            answer = self.ask(question)["answer"]
            write(answer + "\n")
            return answer
        ids, mask = self._prompt(question)
        session = self.session
        embeds, mask = session.prompt_embeddings(
            ids, mask, self.frames[None], None if self.clips is None else self.clips[None]
        )
        self.rng, key = jax.random.split(self.rng)
        tokens, shown = [], ""
        for step_tokens in session.stream(embeds, mask, cfg, key):
            tokens.append(int(step_tokens[0]))
            text = session.tokenizer.decode(tokens, skip_special_tokens=True)
            visible = chat_prompt.answer_text(self.template, text, end)  # what the answer is so far
            if visible.startswith(shown) and len(visible) > len(shown):
                write(visible[len(shown) :])
                sys.stdout.flush()
                shown = visible
        write("\n")
        answer = chat_prompt.answer_text(self.template, session.tokenizer.decode(tokens, skip_special_tokens=True), end)
        chat_prompt.record_answer(self.conversation, answer)
        return answer


def _media(session: Session):
    if bool(_VIDEO.value) == bool(_IMAGE.value):
        raise app.UsageError("give exactly one of --video and --image")
    if _IMAGE.value:
        if _AUDIO.value:
            raise app.UsageError("--audio needs a --video with a sound track")
        return image_frames(_IMAGE.value, session.image_size), None, None
    frames, seconds = video_frames(_VIDEO.value, session.num_frames, session.image_size)
    clips = audio_clips(_VIDEO.value, session.config.data.clips_per_video) if _AUDIO.value else None
    if clips is not None and not session.model.config.equip_audio_branch:
        raise app.UsageError("--audio: this config has no audio branch (model.equip_audio_branch is False)")
    return frames, seconds, clips


def _video_llava_answers(log) -> None:
    """Video-LLaVA: each --question about the --video or --image on its own (no interactive mode yet), as JSON."""
    from vllama_jax import sharded_model
    from vllama_jax.config import model_config
    from vllama_jax.data import llava_video
    from vllama_jax.data.tokenizer import load_tokenizer
    from vllama_jax.infer import llava_answer

    config = _CONFIG.value
    if not (_QUESTION.value and _CKPT.value) or bool(_VIDEO.value) == bool(_IMAGE.value) or _AUDIO.value:
        raise app.UsageError("a Video-LLaVA config takes --ckpt (a parameter checkpoint of the whole model, e.g. "
                             "vllama-convert import's), one of --video and --image, and --question (no audio, no "
                             "interactive mode yet)")
    if not config.data.tokenizer:
        raise app.UsageError("set --config.data.tokenizer to the LLM's tokenizer directory")
    tokenizer = load_tokenizer(config.data.tokenizer)
    model = sharded_model.from_config(config, model_config(config))
    with model.on_mesh():
        params = model.load_frozen(_CKPT.value, model.names)
    towers = model.module.config
    media = (dict(video=llava_video.load_video(_VIDEO.value, towers.video_tower.num_frames,
                                               towers.video_tower.image_size))
             if _VIDEO.value else dict(image=llava_video.load_image(_IMAGE.value, towers.image_tower.image_size)))
    cfg = dataclasses.replace(
        DEMO, do_sample=not _GREEDY.value, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
        top_p=_TOP_P.value, top_k=_TOP_K.value, num_beams=_BEAMS.value, repetition_penalty=_REPETITION.value,
        max_length=_MAX_LENGTH.value, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id,
    )
    turns = []
    for i, question in enumerate(_QUESTION.value):
        started = time.perf_counter()
        with model.on_mesh():
            text, tokens, _ = llava_answer.answer(model.module, params, tokenizer, question, cfg=cfg,
                                                  rng=jax.random.key(_SEED.value + i), **media)
        turns.append({"question": question, "answer": text, "tokens": len(tokens),
                      "seconds": round(time.perf_counter() - started, 2)})
    print(json.dumps({"media": _VIDEO.value or _IMAGE.value, "template": "llava_v1", "turns": turns}))


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    try:
        require_family(_CONFIG.value, "vllama-chat", ("video_llama", "video_llava"))
    except ValueError as err:
        raise app.UsageError(str(err)) from err
    if _CONFIG.value.get("family", "video_llama") == "video_llava":
        return _video_llava_answers(log)
    session = load_session(_CONFIG.value, _CKPT.value, log=log)
    template = _TEMPLATE.value or _CONFIG.value.data.get("template", "vicuna")
    if template not in chat_prompt.TEMPLATE_NAMES:
        raise app.UsageError(f"--template {template!r}: expected one of {chat_prompt.TEMPLATE_NAMES}")
    frames, seconds, clips = _media(session)
    # as the demo: sampling unless --greedy, also with beams (then transformers' beam sampling)
    overrides = dict(
        max_new_tokens=_MAX_NEW.value,
        do_sample=not _GREEDY.value,
        num_beams=_BEAMS.value,
        temperature=_TEMPERATURE.value,
        top_p=_TOP_P.value,
        top_k=_TOP_K.value,
        repetition_penalty=_REPETITION.value,
        min_new_tokens=DEMO.min_new_tokens,
        length_penalty=DEMO.length_penalty,
        max_length=_MAX_LENGTH.value,
    )
    chat = Chat(session, template, "image" if _IMAGE.value else "video", frames, seconds, clips, overrides, _SEED.value)
    if _QUESTION.value:
        turns = [chat.ask(q) for q in _QUESTION.value]
        print(
            json.dumps(
                {
                    "media": _VIDEO.value or _IMAGE.value,
                    "audio": clips is not None,
                    "template": template,
                    "turns": turns,
                }
            )
        )
        return
    print(
        f"Video-LLaMA ({_CONFIG.value.name}, {template} template) is ready: ask about "
        f"{_VIDEO.value or _IMAGE.value}. /reset starts again, /quit leaves.",
        file=sys.stderr,
    )
    while True:
        try:
            question = input("USER: ").strip()
        except EOFError:
            break
        if question == "/quit":
            break
        if question == "/reset":
            chat.reset()
            continue
        if not question:
            continue
        sys.stdout.write("ASSISTANT: ")
        chat.ask_streaming(question)


def cli():
    app.run(main)
