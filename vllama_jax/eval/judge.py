"""Judge mode: Video-ChatGPT's judged open-QA protocol with a local judge instead of a hosted chat model.

The judge is any Hugging Face LLaMA-family directory (config.json, safetensors or .bin weights, a tokenizer),
read by this project's converter (convert/sources.py, convert/llama.py) and run by its own generation
(infer/generate.py), greedy, so reruns give the same verdicts. Each prediction is asked with the protocol's
system and user messages (Video-ChatGPT quantitative_evaluation/evaluate_activitynet_qa.py; the same strings in
Video-LLaVA videollava/eval/video/eval_video_qa.py, run there with gpt-3.5-turbo), rendered by the judge
tokenizer's chat template, or LLaMA-2's [INST] <<SYS>> format when it has none. The replies are appended to
`judge.jsonl` as they come (a rerun judges only the rest) and scored as accuracy = yes / (yes + no) and the mean
score (score.py); replies that are not a {'pred', 'score'} dict are counted as unparsed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from vllama_jax.convert.llama import UNUSED_KEYS, llama_rules
from vllama_jax.convert.mapping import flatten, torch_to_flat_params, unflatten
from vllama_jax.convert.sources import open_source
from vllama_jax.data import conversation
from vllama_jax.eval import report
from vllama_jax.infer.generate import GenerationConfig, generate
from vllama_jax.models.llama import LlamaConfig, LlamaForCausalLM

# The protocol's messages, verbatim (their missing spaces and the double space included): the judge must be
# asked exactly what the published numbers were judged with.
SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and determine "
    "if they match meaningfully. Here's how you can accomplish the task:------##INSTRUCTIONS: - Focus on the "
    "meaningful match between the predicted answer and the correct answer.\n- Consider synonyms or paraphrases "
    "as valid matches.\n- Evaluate the correctness of the prediction compared to the answer."
)
USER = (
    "Please evaluate the following video-based question-answer pair:\n\nQuestion: {question}\nCorrect Answer: "
    "{answer}\nPredicted Answer: {pred}\n\nProvide your evaluation only as a yes/no and score where the score is "
    "an integer value between 0 and 5, with 5 indicating the highest meaningful match. Please generate the "
    "response in the form of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' is  "
    "a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING.DO NOT PROVIDE ANY OTHER OUTPUT "
    "TEXT OR EXPLANATION. Only provide the Python dictionary string. For example, your response should look like "
    "this: {{'pred': 'yes', 'score': 4.8}}."
)
BATCH = 8
PAD_TO = 64


def llama_config(hf_config: dict, where: str) -> LlamaConfig:
    if hf_config.get("model_type") != "llama":
        raise ValueError(f"{where}: model_type {hf_config.get('model_type')!r}; the judge must be a LLaMA-family "
                         "model (model_type 'llama')")
    if hf_config.get("rope_scaling"):
        raise ValueError(f"{where}: rope_scaling {hf_config['rope_scaling']} is not supported by this LLaMA")
    heads = hf_config["num_attention_heads"]
    return LlamaConfig(
        vocab_size=hf_config["vocab_size"], hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"], num_layers=hf_config["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf_config.get("num_key_value_heads") or heads,
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6), rope_theta=float(hf_config.get("rope_theta", 10000.0)))


def load_judge(directory: str | Path):
    """(LlamaForCausalLM, params, tokenizer) of a Hugging Face LLaMA directory, through the converter."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    where = str(directory / "config.json")
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"--judge {directory}: no config.json (a Hugging Face model directory)")
    hf_config = json.loads((directory / "config.json").read_text())
    cfg = llama_config(hf_config, where)
    state = {k.removeprefix("llama_model."): t.load() for k, t in open_source(directory).tensors.items()}
    if "lm_head.weight" not in state and hf_config.get("tie_word_embeddings"):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    llm = LlamaForCausalLM(cfg)
    shapes = jax.eval_shape(lambda: nn.unbox(llm.init(jax.random.key(0), np.zeros((1, 2), np.int32))["params"]))
    flat = torch_to_flat_params(state, llama_rules(cfg), {k: v.shape for k, v in flatten(shapes).items()},
                                source_name=str(directory), ignore=UNUSED_KEYS)
    params = jax.tree_util.tree_map(np.asarray, unflatten(flat))
    return llm, params, AutoTokenizer.from_pretrained(directory)


def judge_prompt(tokenizer, row: dict) -> list[int]:
    user = USER.format(question=row["question"], answer=row["answer"], pred=row.get("pred") or "")
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            add_generation_prompt=True, tokenize=True, return_dict=False))
    ids = tokenizer(conversation.llama_2_render([user, None], SYSTEM))["input_ids"]
    return ids if ids and ids[0] == tokenizer.bos_token_id else [tokenizer.bos_token_id, *ids]


def judge_rows(directory: str, rows: list[dict], path: Path, max_new_tokens: int = 48,
               log=print) -> tuple[list[dict], dict]:
    """Rows with a "judge" field (the judge's raw reply), judging those not yet in `path`; and the judge's
    identity for metrics.json."""
    done = {}
    if path.exists():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for n, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                done[str(record["question_id"])] = record["judge"]
            except (json.JSONDecodeError, KeyError):
                if n != len(lines) or text.endswith("\n"):
                    raise ValueError(f"{path} line {n}: not a judge record; delete it to judge again") from None
                # the append a kill interrupted: drop it, that answer is judged again
                path.write_text("".join(line + "\n" for line in lines[:-1]), encoding="utf-8")
    todo = [r for r in rows if str(r["question_id"]) not in done and not r.get("error")]
    if todo:
        _judge_all(directory, todo, done, path, max_new_tokens)
    judged = []
    for r in rows:  # an example without a prediction (missing video) is judged "no", score 0, as a wrong answer
        reply = done.get(str(r["question_id"]), "{'pred': 'no', 'score': 0}" if r.get("error") else None)
        judged.append({**r, "judge": reply} if reply is not None else r)
    info = {"directory": str(directory), "name": Path(directory).name, "digest": report.digest_files(directory),
            "decoding": "greedy", "max_new_tokens": max_new_tokens, "system": SYSTEM, "user": USER}
    log(f"judged {len(todo)} answers with {directory} ({len(done)} verdicts in {path})")
    return judged, info


def _judge_all(directory: str, todo: list[dict], done: dict, path: Path, max_new_tokens: int) -> None:
    """Ask the judge about each row of `todo`, greedy, in fixed-shape batches; replies go to `done` and `path`."""
    from tqdm import tqdm

    llm, params, tokenizer = load_judge(directory)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)

    def run(params, ids, mask):
        embeds = llm.apply({"params": params}, ids, method=LlamaForCausalLM.embed)
        out = generate(llm, params, embeds, mask, cfg)
        return out.tokens, out.lengths

    run = jax.jit(run)
    with open(path, "a", encoding="utf-8") as out, tqdm(total=len(todo), desc="judging", unit="answer",
                                                         file=sys.stderr) as bar:
        for begin in range(0, len(todo), BATCH):
            batch = todo[begin:begin + BATCH]
            prompts = [judge_prompt(tokenizer, r) for r in batch]
            prompts += [prompts[-1]] * (BATCH - len(batch))
            length = -(-max(map(len, prompts)) // PAD_TO) * PAD_TO
            ids = np.full((BATCH, length), pad, np.int32)
            mask = np.zeros((BATCH, length), bool)
            for i, p in enumerate(prompts):
                ids[i, length - len(p):], mask[i, length - len(p):] = p, True
            tokens, lengths = jax.device_get(run(params, ids, mask))
            for row, t, n in zip(batch, tokens, lengths):
                reply = tokenizer.decode([int(x) for x in t[:int(n)]], skip_special_tokens=True).strip()
                done[str(row["question_id"])] = reply
                out.write(json.dumps({"question_id": row["question_id"], "judge": reply}) + "\n")
            out.flush()
            bar.update(len(batch))
