"""Video-LLaVA's text (`data/llava_conversation.py`): the two templates' exact strings, labels on the answers only,
a video as num_frames frames of 257 placeholders, an image as 256; with the tests' small BPE tokenizer."""
import numpy as np

from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.data import llava_conversation as llava

TURNS = [
    {"from": "human", "value": "<video>\nwhat moves in the video"},
    {"from": "gpt", "value": "a red square"},
    {"from": "human", "value": "to the left"},
    {"from": "gpt", "value": "the cat sat"},
]


def test_the_two_templates_render_as_the_original():
    turns = [{"from": "gpt", "value": "dropped"}, {"from": "human", "value": "<image>\nq"},
             {"from": "gpt", "value": "a"}]
    assert llava.render(turns, "conv_vicuna_v1") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nq ASSISTANT: a</s>")
    assert llava.render(turns[:2], "llava_v1", open_answer=True) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nq ASSISTANT:")


def test_labels_are_the_answers_and_soft_tokens_never(tokenizer):
    ids, labels, matched = llava.conversation_ids(tokenizer, TURNS, num_frames=4)
    assert matched and ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    assert (ids == llava.FRAME_SENTINEL).sum() == 4 and (labels[ids < 0] == IGNORE_INDEX).all()
    labelled = tokenizer.decode(ids[labels != IGNORE_INDEX])
    assert labelled.replace(" ", "") == "aredsquare</s>thecatsat</s>"
    spliced, spliced_labels = llava.splice_placeholders(ids, labels, image_tokens=256, frame_tokens=257,
                                                        image_token_id=32000, video_token_id=32001)
    assert (spliced == 32001).sum() == 4 * 257 and len(spliced) == len(ids) - 4 + 4 * 257
    assert (spliced_labels[spliced == 32001] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(spliced_labels[spliced_labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX])
    cut, cut_labels = llava.splice_placeholders(ids, labels, image_tokens=256, frame_tokens=257,
                                                image_token_id=32000, video_token_id=32001, max_length=100)
    assert len(cut) == len(cut_labels) == 100


def test_text_only_and_image_conversations(tokenizer):
    ids, labels, matched = llava.conversation_ids(tokenizer, TURNS[2:], num_frames=8)
    assert matched and (ids >= 0).all()
    image = [{"from": "human", "value": "<image>\nwhat is it"}, {"from": "gpt", "value": "a cat"}]
    ids, labels, matched = llava.conversation_ids(tokenizer, image, num_frames=8)
    assert matched and (ids == llava.IMAGE_SENTINEL).sum() == 1
    assert tokenizer.decode(ids[labels != IGNORE_INDEX]).replace(" ", "") == "acat</s>"
