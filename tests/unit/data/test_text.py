"""Caption text (`data/text.py`): BLIP's caption cleaner and the [BOS] + soft tokens + caption layout."""
import numpy as np
import pytest

from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.data import text


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
        tokenizer,
        "a cat",
        num_soft_tokens=4,
        image_token_id=image_id,
        max_txt_len=8,
        prompt="the <ImageHere> mat",
        length=24,
    )
    first_label = np.flatnonzero(wrapped["labels"] != IGNORE_INDEX)[0]
    assert wrapped["input_ids"][first_label - 1] != image_id  # " mat" tokens sit between soft tokens and caption
    text.check_placeholders(wrapped["input_ids"][None], image_id, 4)
    with pytest.raises(ValueError, match="row 0: expected 5"):
        text.check_placeholders(wrapped["input_ids"][None], image_id, 5)
