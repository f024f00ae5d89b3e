"""Stage 2's conversation templates (data/conversation.py): token ids and labels of fixed conversations, written
out from the original's rules (video_instruct_dataset.py `preprocess` / `preprocess_for_llama_v2`).

The tokenizer is built here so every token can be named: a word-level vocabulary whose pre-tokenizer cuts the
text into the template's pieces (spaces and newlines are tokens of their own); like the tiny model's BPE it does
not add [BOS] by itself, so conversation.tokenize puts it in front as LLaMA's tokenizer would."""
import numpy as np
import pytest

from vllama_jax.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER
from vllama_jax.data import conversation

WORDS = ["<unk>", "<s>", "</s>", "\n", " ", "###", "Human:", "Assistant:", "unknown:", "[INST]", "[/INST]", "<<SYS>>",
         "<</SYS>>", "hi", "there", "a", "cat", "more", "no", "<Video>", "</Video>", "<Image>", "</Image>", "The",
         "video", "contains", "2", "frames", "sampled", "at", "0.0,", "1.5", "seconds.", "look"]


TURNS = [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "a cat"},
         {"from": "human", "value": "more"}, {"from": "gpt", "value": "no"}]


@pytest.fixture(scope="module")
def words_tokenizer(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vllama_jax.data.tokenizer import load_tokenizer

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"\n| |###|\[/?INST\]|<</?SYS>>|</?Video>|</?Image>|[^\s#<>\[\]]+"), behavior="isolated")
    path = tmp_path_factory.mktemp("words_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        path
    )
    return load_tokenizer(path)


def ids_of(tokenizer, words):
    return [tokenizer.convert_tokens_to_ids(w) for w in words]


def kept(example):
    """Positions whose label is not IGNORE_INDEX (every kept label must equal its input id)."""
    labels, ids = example["labels"], example["input_ids"]
    positions = [i for i in range(len(labels)) if labels[i] != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in positions)
    return positions


def test_vicuna_ids_and_labels(words_tokenizer):
    ex = conversation.training_example(words_tokenizer, TURNS, "vicuna", length=32)
    # "\n\n###Human: hi there\n###Assistant: a cat\n###Human: more\n###Assistant: no\n###", [BOS] first
    words = [
        "<s>",
        "\n",
        "\n",
        "###",
        "Human:",
        " ",
        "hi",
        " ",
        "there",
        "\n",  # 3..9
        "###",
        "Assistant:",
        " ",
        "a",
        " ",
        "cat",
        "\n",  # 10..16
        "###",
        "Human:",
        " ",
        "more",
        "\n",  # 17..21
        "###",
        "Assistant:",
        " ",
        "no",
        "\n",  # 22..26
        "###",
    ]  # 27
    assert list(ex["input_ids"][:28]) == ids_of(words_tokenizer, words)
    assert ex["padding_mask"].sum() == 28 and not ex["truncated"]
    assert (ex["input_ids"][28:] == words_tokenizer.pad_token_id).all()
    # piece lengths counted with a [BOS] each: header 3, turns 8, 8, 6, 6. Masked: [0, 3) (header), [3+2, 3+8) =
    # [5, 11) (first human turn but its first two tokens, one token into the next turn), [19+2, 19+6) = [21, 25).
    assert kept(ex) == [3, 4] + list(range(11, 21)) + [25, 26, 27]


def test_llama_2_ids_and_labels(words_tokenizer):
    ex = conversation.training_example(words_tokenizer, TURNS, "llama_2", length=40)
    # "[INST] <<SYS>>\n \n<</SYS>>\n\nhi there [/INST] a cat </s><s>[INST] more [/INST] no </s>"
    words = [
        "<s>",
        "[INST]",
        " ",
        "<<SYS>>",
        "\n",
        " ",
        "\n",
        "<</SYS>>",
        "\n",
        "\n",
        "hi",
        " ",
        "there",
        " ",
        "[/INST]",  # 1..14
        " ",
        "a",
        " ",
        "cat",
        " ",
        "</s>",  # 15..20
        "<s>",
        "[INST]",
        " ",
        "more",
        " ",
        "[/INST]",  # 21..26
        " ",
        "no",
        " ",
        "</s>",
    ]  # 27..30
    assert list(ex["input_ids"][:31]) == ids_of(words_tokenizer, words)
    assert ex["padding_mask"].sum() == 31
    # round 1: 20 tokens with [BOS]; its instruction "…[/INST] " is 16 with [BOS], minus 2 = 14 masked from 1.
    # round 2 ("<s>[INST] more [/INST] no "): 10 with [BOS]; instruction 8 - 2 = 6 masked from 21.
    assert kept(ex) == list(range(15, 21)) + list(range(27, 31))


def test_video_prefix_goes_before_the_first_question(words_tokenizer):
    turns = [{"from": "system", "value": "ignored"}] + TURNS[:2]
    ex = conversation.training_example(
        words_tokenizer, turns, "vicuna", length=64, media_kind="video", num_soft_tokens=2, frame_seconds=[0.0, 1.5]
    )
    ph = IMAGE_PLACEHOLDER
    words = [
        "<s>",
        "\n",
        "\n",
        "###",
        "Human:",
        " ",
        "<Video>",
        ph,
        ph,
        "</Video>",
        " ",
        "The",
        " ",
        "video",
        " ",
        "contains",
        " ",
        "2",
        " ",
        "frames",
        " ",
        "sampled",
        " ",
        "at",
        " ",
        "0.0,",
        " ",
        "1.5",
        " ",
        "seconds.",
        " ",
        "hi",
        " ",
        "there",
        "\n",
        "###",
        "Assistant:",
        " ",
        "a",
        " ",
        "cat",
        "\n",
        "###",
    ]
    n = len(words)
    assert list(ex["input_ids"][:n]) == ids_of(words_tokenizer, words)
    assert kept(ex) == [3, 4] + list(range(36, n))  # the human turn is 33 tokens with [BOS]: masked [5, 36)


def test_image_tag_is_replaced_in_every_turn(words_tokenizer):
    turns = [{"from": "human", "value": "<image>\nlook"}, {"from": "gpt", "value": "a cat"}]
    ex = conversation.training_example(
        words_tokenizer, turns, "llama_2", length=64, media_kind="image", num_soft_tokens=3
    )
    ph = words_tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    ids = list(ex["input_ids"])
    assert ids.count(ph) == 3
    start = ids.index(ph)
    assert ids[start - 1] == words_tokenizer.convert_tokens_to_ids("<Image>")
    assert ids[start + 3] == words_tokenizer.convert_tokens_to_ids("</Image>")


def test_truncation_and_refusals(words_tokenizer):
    ex = conversation.training_example(words_tokenizer, TURNS, "vicuna", length=12)
    assert ex["truncated"] and ex["padding_mask"].all()
    assert kept(ex) == [3, 4, 11]  # the labels are cut with the ids
    with pytest.raises(ValueError, match="turn 1"):
        conversation.training_example(words_tokenizer, [TURNS[0], TURNS[2]], "llama_2", length=40)
    with pytest.raises(ValueError, match="template"):
        conversation.training_example(words_tokenizer, TURNS, "chatml", length=40)
    with pytest.raises(ValueError, match="role"):
        conversation.training_example(words_tokenizer, [{"from": "bot", "value": "x"}], "vicuna", length=40)


def test_llama_2_drops_a_leading_assistant_turn(words_tokenizer):
    with_lead = conversation.training_example(words_tokenizer, [TURNS[1]] + TURNS, "llama_2", length=40)
    plain = conversation.training_example(words_tokenizer, TURNS, "llama_2", length=40)
    np.testing.assert_array_equal(with_lead["input_ids"], plain["input_ids"])
    np.testing.assert_array_equal(with_lead["labels"], plain["labels"])
