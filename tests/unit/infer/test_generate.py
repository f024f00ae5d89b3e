"""Generation (vllama_jax/infer/generate.py) against recomputation and against transformers' `generate`.

The LLaMA weights travel torch -> JAX through the converter (as in test_torch_parity.py); fp32 throughout.
`pytest -s -k generate` prints the measured logit errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vllama_jax.convert import llama as llama_map
from vllama_jax.convert.mapping import prefixed
from vllama_jax.convert.video_llama import load_state_dict
from vllama_jax.infer.generate import GenerationConfig, generate, prompt_positions, warp_logits
from vllama_jax.models.llama import LlamaConfig, LlamaForCausalLM
from vllama_jax.testing import torch_reference as ref

VOCAB = 512


@pytest.fixture(scope="module", params=[False, True], ids=["unscanned", "scanned"])
def pair(request):
    """(transformers model, our model, our params) with the same random weights; EOS id 2, pad 0."""
    scan = request.param
    torch_model = ref.llama_lm(vocab=VOCAB, kv_heads=2, seed=5)
    torch_model.generation_config.pad_token_id = 0
    torch_model.generation_config.eos_token_id = 2
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, scan_layers=scan)
    model = LlamaForCausalLM(cfg)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    rules = prefixed(llama_map.llama_rules(cfg), "llama_model.", "")
    params = load_state_dict(
        ref.llama_state_dict(torch_model), rules, abstract, [("decoder/layers", 2)] if scan else [], source_name="test"
    )
    return torch_model, model, params


def left_padded(prompts):
    length = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, p in enumerate(prompts):
        ids[row, length - len(p) :] = p
        mask[row, length - len(p) :] = True
    return ids, mask


def ours(model, params, prompts, cfg, rng=None, return_logits=False, with_ids=False):
    ids, mask = left_padded(prompts)
    run = jax.jit(functools.partial(generate, model, cfg=cfg, return_logits=return_logits))
    embeds = model.apply({"params": params}, jnp.asarray(ids), method=LlamaForCausalLM.embed)
    out = run(params, embeds, jnp.asarray(mask), rng=rng, prompt_ids=jnp.asarray(ids) if with_ids else None)
    return [list(np.asarray(out.tokens[r, : int(out.lengths[r])])) for r in range(len(prompts))], out


def theirs(torch_model, prompts, **kwargs):
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        out = torch_model.generate(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(), **kwargs
        )
    rows = []
    for row in out[:, ids.shape[1] :].numpy():
        row = list(row)
        rows.append(row[: row.index(2) + 1] if 2 in row else row)  # up to and with EOS; the rest is padding
    return rows


PROMPTS = [[1, 17, 99, 23, 250, 7], [1, 301, 5], [1, 64, 64, 12, 480, 33, 9, 101]]


def test_greedy_equals_transformers_generate_token_for_token(pair):
    torch_model, model, params = pair
    cfg = GenerationConfig(max_new_tokens=20)
    expected = theirs(torch_model, PROMPTS, do_sample=False, max_new_tokens=20)
    got, _ = ours(model, params, PROMPTS, cfg)
    assert got == expected
    # each prompt alone gives the same tokens as in the left-padded batch
    for prompt, row in zip(PROMPTS, got):
        assert ours(model, params, [prompt], cfg)[0][0] == row


def test_cached_decoding_equals_recomputing_the_whole_sequence(pair):
    _, model, params = pair
    cfg = GenerationConfig(max_new_tokens=12)
    got, out = ours(model, params, PROMPTS, cfg, return_logits=True)
    errors = []
    for row, prompt in enumerate(PROMPTS):
        sequence = np.asarray(prompt + got[row], np.int32)[None]
        full = np.asarray(model.apply({"params": params}, sequence))[0]
        for t in range(len(got[row])):
            errors.append(ref.max_abs(out.logits[row, t], full[len(prompt) - 1 + t]))
    print(f"[generate] cached decoding vs full recompute: max abs logit diff {max(errors):.2e}")
    assert max(errors) <= 1e-5


def test_repetition_penalty_and_eos_match_transformers(pair):
    torch_model, model, params = pair
    # transformers penalises the prompt's ids as well when the prompt is ids: pass them as `prompt_ids`
    expected = theirs(torch_model, PROMPTS, do_sample=False, max_new_tokens=16, repetition_penalty=1.3)
    got, _ = ours(model, params, PROMPTS, GenerationConfig(max_new_tokens=16, repetition_penalty=1.3), with_ids=True)
    assert got == expected
    assert got != ours(model, params, PROMPTS, GenerationConfig(max_new_tokens=16))[0]  # the penalty changed something
    # EOS: make the model stop by declaring its 3rd greedy token the EOS id
    greedy, _ = ours(model, params, PROMPTS[:1], GenerationConfig(max_new_tokens=8))
    stop = int(greedy[0][2])
    stopped, out = ours(model, params, PROMPTS[:1], GenerationConfig(max_new_tokens=8, eos_token_id=stop))
    assert stopped[0] == greedy[0][: greedy[0].index(stop) + 1]
    assert (np.asarray(out.tokens[0, len(stopped[0]) :]) == 0).all()


def test_stop_sequences_end_a_row_and_the_others_go_on(pair):
    _, model, params = pair
    greedy, _ = ours(model, params, PROMPTS, GenerationConfig(max_new_tokens=10))
    stop = tuple(int(t) for t in greedy[0][3:5])  # a two-token stop sequence row 0 produces
    got, _ = ours(model, params, PROMPTS, GenerationConfig(max_new_tokens=10, stop_sequences=(stop,)))
    assert got[0] == greedy[0][:5]
    for row in (1, 2):  # rows that never produce it run to max_new_tokens unchanged
        if not any(tuple(greedy[row][i : i + 2]) == stop for i in range(9)):
            assert got[row] == greedy[row]


@pytest.mark.parametrize("beams,length_penalty", [(3, 1.0), (4, 0.5)])
def test_beam_search_equals_transformers(pair, beams, length_penalty):
    torch_model, model, params = pair
    # EOS inside the vocabulary's likely tokens makes some hypotheses finish early: pick the model's favourite
    # second greedy token as EOS so finished and running beams compete
    greedy, _ = ours(model, params, PROMPTS, GenerationConfig(max_new_tokens=6))
    eos = int(greedy[1][1])
    torch_model.generation_config.eos_token_id = eos
    try:
        for prompt in PROMPTS:
            with torch.no_grad():
                out = torch_model.generate(
                    input_ids=torch.tensor([prompt]),
                    num_beams=beams,
                    do_sample=False,
                    max_new_tokens=10,
                    length_penalty=length_penalty,
                    early_stopping=False,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            expected = [int(t) for t in out.sequences[0, len(prompt) :]]
            expected = expected[: expected.index(eos) + 1] if eos in expected else expected
            cfg = GenerationConfig(max_new_tokens=10, num_beams=beams, length_penalty=length_penalty, eos_token_id=eos)
            got, result = ours(model, params, [prompt], cfg)
            assert got[0] == expected
            assert abs(float(result.scores[0]) - float(out.sequences_scores[0])) <= 1e-4
    finally:
        torch_model.generation_config.eos_token_id = 2


def test_sampling_warpers_match_transformers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    for temperature, top_k, top_p in [(0.7, 0, 0.9), (1.0, 5, 1.0), (1.3, 10, 0.5)]:
        expected = torch.from_numpy(logits)
        for warper in (
            ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
            + ([TopKLogitsWarper(top_k)] if top_k else [])
            + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
        ):
            expected = warper(None, expected)
        got = np.asarray(
            warp_logits(jnp.asarray(logits), GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p))
        )
        np.testing.assert_array_equal(np.isinf(got), np.isinf(expected.numpy()))
        finite = ~np.isinf(got)
        np.testing.assert_allclose(got[finite], expected.numpy()[finite], rtol=1e-6)


def test_sampling_is_seeded_and_follows_top_k(pair):
    _, model, params = pair
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, top_k=1, temperature=0.8)
    greedy, _ = ours(model, params, PROMPTS, GenerationConfig(max_new_tokens=8))
    assert ours(model, params, PROMPTS, cfg, rng=jax.random.key(1))[0] == greedy  # top-1 sampling is greedy
    wide = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5)
    a = ours(model, params, PROMPTS, wide, rng=jax.random.key(1))[0]
    assert a == ours(model, params, PROMPTS, wide, rng=jax.random.key(1))[0]
    assert a != ours(model, params, PROMPTS, wide, rng=jax.random.key(2))[0]


def test_prompt_positions_count_only_real_tokens():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(prompt_positions(jnp.asarray(mask)), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_streaming_yields_the_generated_tokens(pair):
    from vllama_jax.infer.generate import stream

    _, model, params = pair
    cfg = GenerationConfig(max_new_tokens=10)
    expected, _ = ours(model, params, PROMPTS, cfg)
    ids, mask = left_padded(PROMPTS)
    embeds = model.apply({"params": params}, jnp.asarray(ids), method=LlamaForCausalLM.embed)
    steps = np.stack([np.asarray(t) for t in stream(model, params, embeds, jnp.asarray(mask), cfg)], axis=1)
    for row, tokens in enumerate(expected):
        assert list(steps[row, : len(tokens)]) == tokens


def test_max_length_keeps_the_end_of_the_prompt_as_the_demo(pair):
    """The demo's Chat.answer: begin_idx = max(0, prompt + max_new_tokens − max_length), prompt embeddings cut
    to [begin_idx:], then transformers' generate. Each left-padded row keeps its own last positions."""
    from vllama_jax.infer.generate import DEMO, context_start, stream

    torch_model, model, params = pair
    assert DEMO.max_length == 2000 and context_start(1700, DEMO) == 0 and context_start(1750, DEMO) == 50
    cfg = GenerationConfig(max_new_tokens=6, max_length=11)  # room for 5 prompt positions of the longest 8
    keep = cfg.max_length - cfg.max_new_tokens
    expected = theirs(torch_model, [p[-keep:] for p in PROMPTS], do_sample=False, max_new_tokens=6)
    got, _ = ours(model, params, PROMPTS, cfg)
    assert got == expected
    assert got != ours(model, params, PROMPTS, GenerationConfig(max_new_tokens=6))[0]  # the cut changed something
    ids, mask = left_padded(PROMPTS)
    embeds = model.apply({"params": params}, jnp.asarray(ids), method=LlamaForCausalLM.embed)
    steps = np.stack([np.asarray(t) for t in stream(model, params, embeds, jnp.asarray(mask), cfg)], axis=1)
    assert [list(steps[row, : len(tokens)]) for row, tokens in enumerate(got)] == got  # streaming cuts alike
    beams = GenerationConfig(max_new_tokens=6, max_length=11, num_beams=2)
    assert (
        ours(model, params, PROMPTS[:1], beams)[0]
        == ours(model, params, [PROMPTS[0][-keep:]], GenerationConfig(max_new_tokens=6, num_beams=2))[0]
    )
    with pytest.raises(ValueError, match="max_length 6 leaves no room for a prompt"):
        context_start(3, GenerationConfig(max_new_tokens=6, max_length=6))


def test_unstacked_scanned_parameters_decode_the_same(pair):
    """Sessions decode per layer: scanned parameters are unstacked (infer/session.py) and give the same tokens."""
    import dataclasses

    from vllama_jax.infer.session import unstack_decoder

    _, model, params = pair
    if not model.config.scan_layers:
        pytest.skip("needs the scanned layout")
    per_layer = LlamaForCausalLM(dataclasses.replace(model.config, scan_layers=False))
    unstacked = unstack_decoder(params, model.config.num_layers)
    cfg = GenerationConfig(max_new_tokens=10)
    assert ours(per_layer, unstacked, PROMPTS, cfg)[0] == ours(model, params, PROMPTS, cfg)[0]
