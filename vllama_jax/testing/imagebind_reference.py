"""The real ImageBind code (PyPI `imagebind-unofficial`, the upstream source) as a PyTorch reference at tiny sizes.

Its package `__init__` imports torchvision/torchaudio/pytorchvideo, which have no build for this torch; so the
model modules are imported under a bare `imagebind` package whose `__path__` is the installed folder, with a
stand-in `timm.layers` giving the two names they import (DropPath, trunc_normal_).
"""
import importlib.util
import sys
import types

import torch


def _install_stand_ins():
    if "imagebind.models.imagebind_model" in sys.modules:
        return
    spec = importlib.util.find_spec("imagebind")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("imagebind-unofficial is not installed: pip install --no-deps imagebind-unofficial==0.1.1")
    package = types.ModuleType("imagebind")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["imagebind"] = package
    if "timm.layers" not in sys.modules:
        class DropPath(torch.nn.Module):  # timm's semantics: per-sample, scaled by the keep probability
            def __init__(self, drop_prob=0.0):
                super().__init__()
                self.drop_prob = drop_prob

            def forward(self, x):
                if self.drop_prob == 0.0 or not self.training:
                    return x
                keep = 1 - self.drop_prob
                mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
                return x * mask / keep

        timm = types.ModuleType("timm")
        timm_layers = types.ModuleType("timm.layers")
        timm_layers.DropPath = DropPath
        timm_layers.trunc_normal_ = torch.nn.init.trunc_normal_
        timm.layers = timm_layers
        sys.modules.setdefault("timm", timm)
        sys.modules["timm.layers"] = timm_layers


def imagebind_model():
    _install_stand_ins()
    return importlib.import_module("imagebind.models.imagebind_model")


TINY = dict(  # every modality small; the vision preprocessor is fixed at 224 px by the original code
    vision_embed_dim=32, vision_num_blocks=2, vision_num_heads=4, out_embed_dim=48,
    audio_embed_dim=32, audio_num_blocks=2, audio_num_heads=4, audio_drop_path=0.1,
    text_embed_dim=16, text_num_blocks=1, text_num_heads=2,
    depth_embed_dim=16, depth_num_blocks=1, depth_num_heads=2,
    thermal_embed_dim=16, thermal_num_blocks=1, thermal_num_heads=2,
    imu_embed_dim=16, imu_num_blocks=1, imu_num_heads=2,
)


def tiny_imagebind(seed: int = 0, **overrides):
    """A random tiny ImageBindModel (all six modalities, as the real file holds), in eval mode, and its
    tower configs for our model."""
    import dataclasses

    from vllama_jax.models.imagebind import AUDIO_HUGE, VISION_HUGE

    kwargs = {**TINY, **overrides}
    torch.manual_seed(seed)
    model = imagebind_model().ImageBindModel(**kwargs).eval()
    with torch.no_grad():  # the original inits LayerNorms to (1, 0) and biases to 0: randomise so none hide
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith(("norm_1.weight", "norm_2.weight", "norm_layer.weight", ".0.weight")) and p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1 or name.endswith(("bias_k", "bias_v")):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    audio = dataclasses.replace(AUDIO_HUGE, width=kwargs["audio_embed_dim"], num_layers=kwargs["audio_num_blocks"],
                                num_heads=kwargs["audio_num_heads"], mlp_dim=4 * kwargs["audio_embed_dim"],
                                out_dim=kwargs["out_embed_dim"], drop_path=kwargs["audio_drop_path"])
    vision = dataclasses.replace(VISION_HUGE, width=kwargs["vision_embed_dim"], num_layers=kwargs["vision_num_blocks"],
                                 num_heads=kwargs["vision_num_heads"], mlp_dim=4 * kwargs["vision_embed_dim"],
                                 out_dim=kwargs["out_embed_dim"])
    return model, audio, vision


def get_audio_feature(model, inputs, modality: str):
    """Video-LLaMA's `ImageBindModel.get_audio_feature` (its copy adds this method to the upstream class):
    (feature = head without its last Linear, embedding = full head + postprocessor), both (B, S, ·)."""
    batch, count = inputs.shape[:2]
    flat = inputs.reshape(batch * count, *inputs.shape[2:])
    pre = model.modality_preprocessors[modality](**{modality: flat})
    trunk = model.modality_trunks[modality](**pre["trunk"])
    feature = model.modality_heads[modality][:-1](trunk, **pre["head"])
    embedding = model.modality_postprocessors[modality](model.modality_heads[modality][-1:](feature, **pre["head"]))
    return feature.reshape(batch, count, -1), embedding.reshape(batch, count, -1)


class TorchAudioBranch(torch.nn.Module):
    """The original `encode_audioQformer` composed from the real parts: ImageBind's `get_audio_feature` → +
    nn.Embedding(8, 1024-analog) → Q-Former (transformers' Blip2QFormerModel) → Linear."""

    def __init__(self, imagebind, embed_dim, hidden, llm_hidden, num_queries):
        from vllama_jax.testing import torch_reference as ref

        super().__init__()
        self.audio_encoder = imagebind
        self.audio_position_embedding = torch.nn.Embedding(8, embed_dim)
        self.audio_Qformer = ref.qformer_model(hidden=hidden, layers=2, encoder_width=embed_dim, freq=1, seed=3)
        self.audio_query_tokens = torch.nn.Parameter(0.02 * torch.randn(1, num_queries, hidden))
        self.audio_llama_proj = torch.nn.Linear(hidden, llm_hidden)

    def forward(self, inputs, modality):
        _, embedding = get_audio_feature(self.audio_encoder, inputs, modality)
        embedding = embedding + self.audio_position_embedding(torch.arange(inputs.shape[1]))[None]
        query = self.audio_query_tokens.expand(inputs.shape[0], -1, -1)
        hidden = self.audio_Qformer(query_embeds=query, encoder_hidden_states=embedding).last_hidden_state
        return self.audio_llama_proj(hidden)

    def original_state_dict(self):
        from vllama_jax.testing import torch_reference as ref

        state = {f"audio_encoder.{k}": v.numpy() for k, v in self.audio_encoder.state_dict().items()}
        state.update(ref.qformer_state_dict(self.audio_Qformer, prefix="audio_Qformer."))
        for name in ("audio_position_embedding.weight", "audio_query_tokens", "audio_llama_proj.weight",
                     "audio_llama_proj.bias"):
            state[name] = self.state_dict()[name].numpy()
        return state


AUDIO_PREFIXES = ("audio_encoder.", "audio_position_embedding.", "audio_Qformer.", "audio_query_tokens",
                  "audio_llama_proj.")


def tiny_audio_model(base_config, seed: int = 0):
    """Tiny Video-LLaMA (`base_config`, a ModelConfig) with the audio branch sized like `tiny_imagebind`, its
    audio weights loaded from a random PyTorch twin: (config, model, params, torch_branch)."""
    import dataclasses

    import flax.linen as nn
    import jax
    import numpy as np

    from vllama_jax.convert.video_llama import UNUSED_KEYS, load_state_dict, scanned_subtrees, video_llama_rules
    from vllama_jax.models.video_llama import VideoLlama, init_params

    torch_imagebind, audio_cfg, vision_cfg = tiny_imagebind(seed=seed)
    cfg = dataclasses.replace(base_config, equip_audio_branch=True, imagebind_audio=audio_cfg,
                              imagebind_vision=vision_cfg, num_audio_query_tokens=8,
                              image_token_id=510, audio_token_id=511)
    torch.manual_seed(5)
    torch_branch = TorchAudioBranch(torch_imagebind, 48, base_config.audio_qformer.hidden_size,
                                    base_config.llm.hidden_size, 8).eval()
    model = VideoLlama(cfg)
    params = jax.jit(lambda: nn.unbox(init_params(model, jax.random.key(0))))()
    params = jax.tree_util.tree_map(np.asarray, params)
    audio_names = [k for k in params if k.startswith("audio_")]
    rules = [r for r in video_llama_rules(cfg) if r.source.startswith(AUDIO_PREFIXES)]
    scanned = [s for s in scanned_subtrees(cfg) if s[0].startswith("audio_")]
    loaded = load_state_dict(torch_branch.original_state_dict(), rules, {k: params[k] for k in audio_names}, scanned,
                             ignore=UNUSED_KEYS)
    return cfg, model, {**params, **loaded}, torch_branch
