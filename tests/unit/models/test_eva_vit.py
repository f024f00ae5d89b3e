"""EVA-CLIP ViT-g/14 and ln_vision (`models/eva_vit.py`): parity with transformers' Blip2VisionModel at a tiny size, and
the full-size parameter counts by shape (SPEC.md)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vllama_jax.config import load_config, model_config
from vllama_jax.convert import eva_vit as eva_map
from vllama_jax.convert.mapping import prefixed
from vllama_jax.models.eva_vit import EvaVisionTransformer, EvaVitConfig, ln_vision
from vllama_jax.models.video_llama import VideoLlama, count_params
from vllama_jax.testing import torch_reference as ref
from vllama_jax.testing.torch_reference import load, report


class VisionWithLn(nn.Module):
    config: EvaVitConfig

    @nn.compact
    def __call__(self, frames):
        return ln_vision(self.config)(EvaVisionTransformer(self.config, name="visual_encoder")(frames))


@pytest.mark.parametrize("scan", [False, True])
def test_vit_and_ln_vision_parity(scan):
    torch_model = ref.vision_model(width=48, layers=3, heads=4, mlp=96, image_size=42)
    cfg = EvaVitConfig(image_size=42, width=48, num_layers=3, num_heads=4, mlp_dim=96, scan_layers=scan)
    rules = prefixed(eva_map.vit_rules(cfg), "visual_encoder.", "visual_encoder") + eva_map.ln_vision_rules()
    x = np.random.default_rng(0).standard_normal((2, 42, 42, 3)).astype(np.float32)
    scanned = [("visual_encoder/blocks", 3)] if scan else []
    params = load(VisionWithLn(cfg), (x,), ref.eva_state_dict(torch_model), rules, scanned)
    ours = VisionWithLn(cfg).apply({"params": params}, x)
    with torch.no_grad():
        theirs = torch_model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    assert ours.shape == theirs.shape == (2, 10, 48)
    report(f"ViT + ln_vision (scan={scan})", ref.max_abs(ours, theirs))


def abstract_video_llama(repo_root, name):
    cfg = model_config(load_config(f"{repo_root}/configs/video_llama.py:{name}"))
    model = VideoLlama(cfg)
    frames = jax.ShapeDtypeStruct((1, 8, 224, 224, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 64), jnp.int32)
    params = jax.eval_shape(lambda f, i: model.init(jax.random.key(0), f, i)["params"], frames, ids)
    return cfg, model, params, frames, ids


@pytest.fixture(scope="module")
def llama2_7b(repo_root):
    return abstract_video_llama(repo_root, "llama2_7b_chat")


def test_vision_tower_counts(llama2_7b):
    _, _, params, _, _ = llama2_7b
    assert count_params(params, ("visual_encoder", "ln_vision")) == 985_897_344
    assert count_params(params, ("Qformer",)) == 105_137_664
    assert count_params(params, ("query_tokens",)) == 24_576
    assert count_params(params, ("video_Qformer",)) == 18_905_088
