"""What the model is asked per task (the question that follows the media in the chat template's first turn).

- open QA: the question, then LLaVA's short-answer instruction: chat models answer in sentences otherwise,
  and exact match needs the one word (EVAL.md, Video-ChatGPT#28).
- multiple choice: MVBench's prompt ("Question: …\\nOptions:\\n(A) …\\n" + the letter instruction,
  VideoLLaMA2's inference_video_mcqa_mvbench.py); the log-likelihood mode asks the same without the letter
  instruction and scores each option's text as the answer.
- caption: one sentence asked for; the `caption` template (stage-1 models) has no question at all.
"""
from __future__ import annotations

from vllama_jax.eval.metrics import LETTERS
from vllama_jax.eval.readers import Example

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly and only give the best option."
CAPTION_QUESTION = "Describe this video in one sentence."


def options_block(question: str, candidates) -> str:
    lines = [f"Question: {question}", "Options:"] + [f"({LETTERS[i]}) {c}" for i, c in enumerate(candidates)]
    return "\n".join(lines) + "\n"


def question_text(task: str, example: Example, likelihood: bool = False) -> str:
    if task == "open_qa":
        return f"{example.question} {SHORT_ANSWER}"
    if task == "multiple_choice":
        return options_block(example.question, example.candidates) + ("" if likelihood else LETTER_ANSWER)
    if task == "caption":
        return CAPTION_QUESTION
    raise ValueError(f"unknown task {task!r}")


def describe(task: str, template: str, likelihood: bool) -> dict:
    """The prompt as metrics.json records it."""
    shown = Example("<id>", "<video>", "<question>", candidates=("<option 1>", "<option 2>"))
    return {
        "template": template,
        "question": "(none: stage 1's [BOS] + soft tokens)" if template == "caption"
        else question_text(task, shown, likelihood),
        "scored_continuation": "each option's text" if likelihood else None,
    }
