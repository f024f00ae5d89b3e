"""The benchmark's train-step comparison (`bench/train_step.py`): its loss cross-check against PyTorch passes for the
same weights and fails when the weights differ."""

import pytest


def _tiny_without_dropout(tiny_config):
    config = tiny_config.copy_and_resolve_references()
    config.model.video_qformer.hidden_dropout = 0.0
    config.model.video_qformer.attention_dropout = 0.0
    return config


def test_cross_check_passes_for_the_same_weights_and_fails_otherwise(tiny_config, monkeypatch):
    from vllama_jax.bench import train_step
    from vllama_jax.testing.torch_reference import TorchVideoLlama

    config = _tiny_without_dropout(tiny_config)
    result = train_step.compare_train_steps(config, batch_size=2, check_steps=3, timed_steps=1, log=lambda *_: None)
    assert result["max_loss_diff"] <= 1e-5 and len(result["losses"]["ours"]) == 3
    assert result["losses"]["ours"][2] != result["losses"]["ours"][0]  # the updates change the loss

    original = TorchVideoLlama.original_state_dict

    def shifted(self):  # our copy of llama_proj gets a different bias than PyTorch's
        state = original(self)
        state["llama_proj.bias"] = state["llama_proj.bias"] + 0.5
        return state

    monkeypatch.setattr(TorchVideoLlama, "original_state_dict", shifted)
    with pytest.raises(AssertionError, match="differs from PyTorch"):
        train_step.compare_train_steps(config, batch_size=2, check_steps=1, timed_steps=1, log=lambda *_: None)
