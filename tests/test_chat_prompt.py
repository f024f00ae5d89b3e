"""The demo's inference conversation (infer/chat_prompt.py): prompt strings as the original get_prompt writes
them, segment-wise tokenisation around the placeholders, stop sequences and answer clean-up."""
from types import SimpleNamespace

from vllama_jax.constants import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER
from vllama_jax.infer import chat_prompt as cp

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
    assert message.startswith("Close your eyes, open your ears and you imagine only based on the sound that: <AudioHere>.")
    assert message.index(AUDIO_PLACEHOLDER) < message.index(IMAGE_PLACEHOLDER)
    image = cp.new_conversation("vicuna", "image", None, False)
    assert image.messages == [["Human", "<Image><ImageHere></Image> "]]


def session(tokenizer, counts):
    return SimpleNamespace(tokenizer=tokenizer, placeholder_counts=lambda: counts,
                           config=SimpleNamespace(data={"template": "vicuna"}))


def test_segment_ids_expand_each_placeholder_and_tokenise_between(tokenizer):
    counts = {IMAGE_PLACEHOLDER: 3, AUDIO_PLACEHOLDER: 2}
    prompt = "the cat" + AUDIO_PLACEHOLDER + " sat" + IMAGE_PLACEHOLDER + " on the mat"
    ids = cp.segment_ids(tokenizer, prompt, counts)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    image, audio = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER), tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER)
    assert ids == [tokenizer.bos_token_id, *encode("the cat"), audio, audio, *encode(" sat"), image, image, image,
                   *encode(" on the mat")]
    # the caption template is stage 1's prompt: [BOS] + audio block + video block
    conv = cp.new_conversation("caption", "video", [0.0], with_audio=True)
    assert cp.answer_prompt_ids(session(tokenizer, counts), conv, "ignored") == [tokenizer.bos_token_id, audio, audio,
                                                                                 image, image, image]


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
    import pytest

    from vllama_jax.infer.session import load_session

    with pytest.raises(FileNotFoundError, match="nope"):
        load_session(tiny_config, str(tmp_path / "nope"))
    run = tmp_path / "run"
    tokenizer.save_pretrained(run / "tokenizer")
    (run / "checkpoints").mkdir(parents=True)  # a run directory that never saved a step
    with pytest.raises(FileNotFoundError, match="no trainable weights"):
        load_session(tiny_config, str(run), log=lambda *_: None)
