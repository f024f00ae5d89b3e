"""The demo's inference conversation (infer/chat_prompt.py): prompt strings as the original get_prompt writes
them, segment-wise tokenisation around the placeholders, stop sequences and answer clean-up."""
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllama_jax.constants import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER
from vllama_jax.infer import chat_prompt as cp

REPO = Path(__file__).resolve().parents[3]
FRAMES = "<Video><ImageHere></Video> The video contains 2 frames sampled at 0.0, 0.5 seconds. "


def two_turns(template, with_audio=False):
    conv = cp.new_conversation(template, "video", [0.0, 0.5], with_audio)
    cp.ask(conv, "What?")
    conv.messages.append([cp.ROLES[template][1], None])
    first = cp.render(conv)
    cp.record_answer(conv, "A cat.")
    cp.ask(conv, "More?")
    conv.messages.append([cp.ROLES[template][1], None])
    return first, cp.render(conv)


def test_vicuna_prompt_is_the_demos_single_separator_style():
    first, second = two_turns("vicuna")
    # the frame message ends in a space and `ask` joins with another one: the demo's double space, copied
    assert first == "###Human: " + FRAMES + " What?###Assistant:"
    assert second == "###Human: " + FRAMES + " What?###Assistant: A cat.###Human: More?###Assistant:"


def test_llama_2_prompt_wraps_the_system_and_each_instruction():
    first, second = two_turns("llama_2")
    head = f"[INST] <<SYS>>\n{cp.LLAMA_2_SYSTEM}\n<</SYS>>\n\n" + FRAMES + " What? [/INST]"
    assert first == head
    assert second == head + " A cat. </s><s>[INST] More? [/INST]"


def test_audio_video_message_and_the_empty_system():
    conv = cp.new_conversation("llama_2", "video", [0.0], with_audio=True)
    assert conv.system == ""  # upload_video sets conv.system = "" when the video has sound
    message = conv.messages[0][1]
    assert message.startswith(
        "Close your eyes, open your ears and you imagine only based on the sound that: <AudioHere>."
    )
    assert message.index(AUDIO_PLACEHOLDER) < message.index(IMAGE_PLACEHOLDER)
    image = cp.new_conversation("vicuna", "image", None, False)
    assert image.messages == [["Human", "<Image><ImageHere></Image> "]]


def session(tokenizer, counts):
    return SimpleNamespace(
        tokenizer=tokenizer, placeholder_counts=lambda: counts, config=SimpleNamespace(data={"template": "vicuna"})
    )


def test_segment_ids_expand_each_placeholder_and_tokenise_between(tokenizer):
    counts = {IMAGE_PLACEHOLDER: 3, AUDIO_PLACEHOLDER: 2}
    prompt = "the cat" + AUDIO_PLACEHOLDER + " sat" + IMAGE_PLACEHOLDER + " on the mat"
    ids = cp.segment_ids(tokenizer, prompt, counts)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    image, audio = (
        tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER),
    )
    assert ids == [
        tokenizer.bos_token_id,
        *encode("the cat"),
        audio,
        audio,
        *encode(" sat"),
        image,
        image,
        image,
        *encode(" on the mat"),
    ]
    # the caption template is stage 1's prompt: [BOS] + audio block + video block
    conv = cp.new_conversation("caption", "video", [0.0], with_audio=True)
    assert cp.answer_prompt_ids(session(tokenizer, counts), conv, "ignored") == [
        tokenizer.bos_token_id,
        audio,
        audio,
        image,
        image,
        image,
    ]


def test_stop_sequences_and_answer_clean_up(tokenizer):
    s = session(tokenizer, {})
    stops = cp.stop_sequences(s, None, "vicuna")
    assert tuple(tokenizer("###", add_special_tokens=False)["input_ids"]) in stops
    for seq in stops:
        assert tokenizer.decode(list(seq)).strip() == "###"
    assert cp.stop_sequences(s, None, "llama_2") == ()
    assert cp.stop_sequences(s, "\n", "caption") == (tuple(tokenizer("\n", add_special_tokens=False)["input_ids"]),)
    assert cp.answer_text("vicuna", " Assistant: a red square### Human: next") == "a red square"
    assert cp.answer_text("llama_2", "ASSISTANT: a blue circle </s>") == "a blue circle"
    assert cp.answer_text("caption", "a red square moves left\nsomething", "\n") == "a red square moves left"


def test_a_session_refuses_a_missing_or_empty_checkpoint(tiny_config, tmp_path, tokenizer):
    from vllama_jax.infer.session import load_session

    with pytest.raises(FileNotFoundError, match="nope"):
        load_session(tiny_config, str(tmp_path / "nope"))
    run = tmp_path / "run"
    tokenizer.save_pretrained(run / "tokenizer")
    (run / "checkpoints").mkdir(parents=True)  # a run directory that never saved a step
    with pytest.raises(FileNotFoundError, match="no trainable weights"):
        load_session(tiny_config, str(run), log=lambda *_: None)


@pytest.fixture(scope="module")
def av_session(tmp_path_factory, tiny_config, tokenizer):
    """The tiny audio-visual model, random weights, the test tokenizer: enough to check the wiring."""
    from vllama_jax.config import load_config
    from vllama_jax.infer.session import load_session

    path = tmp_path_factory.mktemp("av") / "tokenizer"
    tokenizer.save_pretrained(path)
    config = load_config(str(REPO / "configs/tiny_shapes.py:variant=audio_visual"))
    config.data.tokenizer = str(path)
    return load_session(config, None, log=lambda *_: None)


def test_audio_and_video_of_a_real_mp4_reach_the_prompt(av_session, tmp_path):
    """--audio: the demo's audio-video message, both soft-token blocks spliced where their placeholders are."""
    import numpy as np

    from vllama_jax.data.media import audio_clips, video_frames
    from vllama_jax.data.synthetic import write_test_video
    from vllama_jax.infer.chat import Chat

    clip = write_test_video(tmp_path / "beep.mp4", num_frames=48, tone_hz=880.0)
    s = av_session
    frames, seconds = video_frames(clip, s.num_frames, s.image_size)
    clips = audio_clips(clip, s.config.data.clips_per_video)
    chat = Chat(s, "vicuna", "video", frames, seconds, clips, dict(max_new_tokens=4, do_sample=False), seed=0)
    ids = np.asarray(chat_prompt_ids(chat, "What do you hear?"))
    counts = s.placeholder_counts()
    image, audio = (s.tokenizer.convert_tokens_to_ids(p) for p in (IMAGE_PLACEHOLDER, AUDIO_PLACEHOLDER))
    assert (ids == audio).sum() == counts[AUDIO_PLACEHOLDER] and (ids == image).sum() == counts[IMAGE_PLACEHOLDER]
    assert np.flatnonzero(ids == audio).max() < np.flatnonzero(ids == image).min()  # the sound first, as the demo
    mask = np.ones_like(ids, bool)[None]
    heard = np.asarray(s.prompt_embeddings(ids[None], mask, frames[None], clips[None])[0])
    silent = np.asarray(s.prompt_embeddings(ids[None], mask, frames[None], np.zeros_like(clips)[None])[0])
    changed = np.flatnonzero(np.abs(heard - silent).max(-1)[0] > 0)
    np.testing.assert_array_equal(changed, np.flatnonzero(ids == audio))  # the sound moves its soft tokens only
    first = chat.ask("What do you hear?")
    assert first["prompt_tokens"] == len(ids) and first["dropped_prompt_tokens"] == 0
    streamed = Chat(s, "vicuna", "video", frames, seconds, clips, dict(max_new_tokens=4, do_sample=False), seed=0)
    assert streamed.ask_streaming("What do you hear?", write=lambda _: None) == first["answer"]  # the two paths agree
    second = chat.ask("And now?")  # the second prompt carries the first exchange
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["new_tokens"]


def test_an_image_is_one_frame_with_the_image_message(av_session, tmp_path):
    from vllama_jax.data.media import image_frames
    from vllama_jax.data.synthetic import write_test_image
    from vllama_jax.infer.chat import Chat

    s = av_session
    frames = image_frames(write_test_image(tmp_path / "x.jpg"), s.image_size)
    assert frames.shape == (1, s.image_size, s.image_size, 3)
    chat = Chat(s, "llama_2", "image", frames, None, None, dict(max_new_tokens=3, do_sample=False), seed=0)
    turn = chat.ask("What colour is it?")
    assert chat.conversation.messages[0][1].startswith("<Image><ImageHere></Image>  What colour is it?")
    assert chat.conversation.messages[1] == ["ASSISTANT", turn["answer"]]  # the answer joins the conversation
    (tmp_path / "broken.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="broken.jpg: not a readable image"):
        image_frames(tmp_path / "broken.jpg", s.image_size)


def test_a_long_conversation_keeps_its_end_as_the_demo(av_session, tmp_path):
    """max_length (the demo's 2000): the prompt's embeddings, soft tokens spliced in, keep their last
    max_length − max_new_tokens positions; here the cut falls inside the video's soft-token block."""
    import numpy as np

    from vllama_jax.data.media import video_frames
    from vllama_jax.data.synthetic import write_test_video
    from vllama_jax.infer.chat import Chat

    s = av_session
    frames, seconds = video_frames(write_test_video(tmp_path / "clip.mp4", num_frames=24), s.num_frames, s.image_size)
    overrides = dict(max_new_tokens=3, do_sample=False)
    ids = np.asarray(chat_prompt_ids(Chat(s, "vicuna", "video", frames, seconds, None, overrides, seed=0), "What?"))
    image = s.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    begin = int(np.flatnonzero(ids == image)[1])  # drop BOS, the text before the block and its first soft token
    chat = Chat(s, "vicuna", "video", frames, seconds, None, dict(overrides, max_length=len(ids) - begin + 3), seed=0)
    turn = chat.ask("What?")
    assert turn["prompt_tokens"] == len(ids) and turn["dropped_prompt_tokens"] == begin
    # the same answer from the embeddings cut by hand, generated without a max_length
    mask = np.ones_like(ids, bool)[None]
    embeds, _ = s.prompt_embeddings(ids[None], mask, frames[None])
    cfg = dataclasses.replace(chat.cfg, stop_sequences=cp.stop_sequences(s, None, "vicuna"), max_length=None)
    tokens = [int(t[0]) for t in s.stream(embeds[:, begin:], mask[:, begin:], cfg)]
    text = s.tokenizer.decode(tokens, skip_special_tokens=True)
    assert turn["new_tokens"] == len(tokens) and turn["answer"] == cp.answer_text("vicuna", text)
    assert tokens != [int(t[0]) for t in s.stream(embeds, mask, cfg)]  # the whole prompt answers otherwise


def chat_prompt_ids(chat, question):
    """The ids Chat would generate from, without changing its conversation."""
    import copy

    return cp.answer_prompt_ids(chat.session, copy.deepcopy(chat.conversation), question)
