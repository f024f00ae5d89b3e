"""PyTorch references for Video-LLaVA: transformers' `VideoLlavaForConditionalGeneration` at tiny random weights
(images, and videos without temporal attention), and our own PyTorch LanguageBind video tower with the temporal
layers, written from the semantics of the original `videollava/model/multimodal_encoder/languagebind/video/
modeling_video.py` (`CLIPEncoderLayer` with `add_time_attn`), since transformers has no such tower.

`original_state_dict` renames transformers' weights to the original release's keys and adds the temporal
tower's, so the weights reach JAX through the project's own mapping (`vllama_jax.convert.video_llava`).
Needs torch (the `test` extra).
"""
import re

import numpy as np
import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

from vllama_jax.testing.torch_reference import numpy_state, randomize

ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": nn.functional.gelu}


def hf_model(tower, llm, image_token_id: int, video_token_id: int, seed: int = 0) -> VideoLlavaForConditionalGeneration:
    """transformers' Video-LLaVA at the sizes of our tower (`ClipVitConfig`) and LLM (`LlamaConfig`), random
    weights everywhere, fp32, eager attention."""
    config = VideoLlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=tower.width, intermediate_size=tower.mlp_dim, num_hidden_layers=tower.num_layers,
            num_attention_heads=tower.num_heads, image_size=tower.image_size, patch_size=tower.patch_size,
            hidden_act=tower.hidden_act, layer_norm_eps=tower.layer_norm_eps,
        ),
        text_config=LlamaConfig(
            vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
            num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
            rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta, tie_word_embeddings=False,
        ),
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        vision_feature_layer=tower.select_layer,
        image_seq_length=tower.num_patches,
        video_seq_length=tower.num_frames * (tower.num_patches + 1),
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize(VideoLlavaForConditionalGeneration(config), seed)


class ClipAttention(nn.Module):
    """CLIP attention: biased q/k/v/out projections, scaled dot product, no mask."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        batch, length, width = x.shape
        split = lambda t: t.view(batch, length, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(batch, length, width))


class TemporalLayer(nn.Module):
    """One LanguageBind video layer: temporal embedding and temporal attention across frames, then the spatial
    block. x: (B·T, tokens, width) with frames of one video adjacent."""

    def __init__(self, width: int, heads: int, mlp: int, frames: int, eps: float, act: str):
        super().__init__()
        self.frames, self.act = frames, ACTIVATIONS[act]
        self.temporal_embedding = nn.Parameter(torch.zeros(1, frames, width))
        self.temporal_layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.temporal_attn = ClipAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = ClipAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(width, mlp), "fc2": nn.Linear(mlp, width)})

    def forward(self, x):
        t = self.frames
        bt, n, d = x.shape
        by_position = lambda h: h.view(bt // t, t, n, d).permute(0, 2, 1, 3).reshape(-1, t, d)  # (b·n, t, d)  # noqa: E731
        by_frame = lambda h: h.view(bt // t, n, t, d).permute(0, 2, 1, 3).reshape(bt, n, d)  # (b·t, n, d)  # noqa: E731
        if t != 1:
            x = by_frame(by_position(x) + self.temporal_embedding[:, :t, :])
        x = x + by_frame(self.temporal_attn(self.temporal_layer_norm1(by_position(x))))
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp["fc2"](self.act(self.mlp["fc1"](self.layer_norm2(x))))


class TemporalVideoTower(nn.Module):
    """LanguageBind_Video_merge's vision transformer: (B, C, T, H, W) -> every hidden state as (B, T, tokens,
    width), as the original reshapes them (hidden_states[0] after pre_layrnorm)."""

    def __init__(self, tower):
        super().__init__()
        width = tower.width
        self.patch = tower.patch_size
        self.embeddings = nn.Module()
        self.embeddings.class_embedding = nn.Parameter(torch.zeros(width))
        self.embeddings.patch_embedding = nn.Conv2d(3, width, tower.patch_size, tower.patch_size, bias=False)
        self.embeddings.position_embedding = nn.Embedding(tower.num_patches + 1, width)
        self.pre_layrnorm = nn.LayerNorm(width, eps=tower.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            TemporalLayer(width, tower.num_heads, tower.mlp_dim, tower.num_frames, tower.layer_norm_eps,
                          tower.hidden_act)
            for _ in range(tower.num_layers)
        )
        self.post_layernorm = nn.LayerNorm(width, eps=tower.layer_norm_eps)

    def forward(self, videos):
        b, c, t, h, w = videos.shape
        frames = videos.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        patches = self.embeddings.patch_embedding(frames).flatten(2).transpose(1, 2)
        cls = self.embeddings.class_embedding.expand(b * t, 1, -1)
        x = torch.cat([cls, patches], dim=1) + self.embeddings.position_embedding.weight
        x = self.pre_layrnorm(x)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return [s.view(b, t, *s.shape[1:]) for s in states]


def temporal_tower(tower, seed: int = 1) -> TemporalVideoTower:
    return randomize(TemporalVideoTower(tower), seed)


HF_TO_ORIGINAL = (
    (r"^model\.image_tower\.", "model.image_tower.image_tower."),
    (r"^model\.video_tower\.", "model.video_tower.video_tower."),
    (r"^model\.multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
    (r"^model\.multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
    (r"^model\.language_model\.", "model."),
)


def original_state_dict(model: VideoLlavaForConditionalGeneration, video_tower: TemporalVideoTower | None) -> dict:
    """The weights under the original release's keys; the video tower's from `video_tower` (with its temporal
    layers) when given."""
    out = {}
    for key, value in numpy_state(model).items():
        for pattern, replacement in HF_TO_ORIGINAL:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    if video_tower is not None:
        out = {k: v for k, v in out.items() if not k.startswith("model.video_tower.")}
        out.update({f"model.video_tower.video_tower.{k}": v for k, v in numpy_state(video_tower).items()})
    return out


@torch.no_grad()
def logits_with_video_tower(model: VideoLlavaForConditionalGeneration, video_tower: TemporalVideoTower, input_ids,
                            images, videos, select_layer: int = -2) -> np.ndarray:
    """transformers' image path and LLM, with the video soft tokens from the temporal tower (hidden state
    `select_layer`, every token of every frame, through transformers' projector), spliced as transformers does.
    images (N, 3, H, W), videos (N, T, 3, H, W); returns float32 logits."""
    inner = model.model
    embeds = inner.get_input_embeddings()(input_ids)
    if images is not None:
        image_soft = inner.get_image_features(pixel_values=images, return_dict=True).pooler_output
        embeds = embeds.masked_scatter((input_ids == model.config.image_token_index)[..., None], image_soft)
    states = video_tower(videos.permute(0, 2, 1, 3, 4))
    video_soft = inner.multi_modal_projector(states[select_layer].flatten(1, 2))
    embeds = embeds.masked_scatter((input_ids == model.config.video_token_index)[..., None], video_soft)
    return model(inputs_embeds=embeds).logits.float().numpy()
