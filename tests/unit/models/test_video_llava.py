"""Video-LLaVA against PyTorch, tiny random weights, fp32, logits within 1e-5 (max absolute difference):
- images, and videos without temporal attention: transformers' `VideoLlavaForConditionalGeneration`, its weights
  under the original release's keys, through the project's mapping (`convert/video_llava.py`);
- videos with temporal attention: our PyTorch LanguageBind video tower (`testing/video_llava_reference.py`,
  written from the original modeling_video.py) in front of transformers' projector and LLM."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vllama_jax.config import model_config
from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.convert import video_llava as convert
from vllama_jax.models import video_llava
from vllama_jax.testing import video_llava_reference as reference

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def setup(repo_root):
    from vllama_jax.config import load_config

    config = model_config(load_config(str(repo_root / "configs/video_llava.py:llm=tiny")))
    spatial = dataclasses.replace(config, video_tower=dataclasses.replace(config.video_tower, temporal_attention=False))
    hf = reference.hf_model(config.image_tower, config.llm, config.image_token_id, config.video_token_id)
    tower = reference.temporal_tower(config.video_tower)
    rng = np.random.default_rng(0)
    size, frames = config.image_tower.image_size, config.video_tower.num_frames
    images = rng.standard_normal((1, size, size, 3)).astype(np.float32)
    videos = rng.standard_normal((1, frames, size, size, 3)).astype(np.float32)
    # rows: an image and a question; a video and a question; text only (reads neither)
    ids = rng.integers(3, 500, (3, 6 + config.video_tokens)).astype(np.int32)
    ids[0, 1:1 + config.image_tokens] = config.image_token_id
    ids[1, 1:1 + config.video_tokens] = config.video_token_id
    return config, spatial, hf, tower, images, videos, ids


def jax_params(config, state_dict):
    abstract = jax.eval_shape(lambda: video_llava.init_params(video_llava.VideoLlava(config), jax.random.key(0)))
    params, layout = convert.import_params(state_dict, config, nn.unbox(abstract))
    return params, layout


def torch_images(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def torch_videos(videos):
    return torch.from_numpy(videos).permute(0, 1, 4, 2, 3)


def test_images_and_spatial_videos_match_transformers(setup):
    config, spatial, hf, _, images, videos, ids = setup
    params, layout = jax_params(spatial, reference.original_state_dict(hf, None))
    assert layout == "original"
    ours = video_llava.VideoLlava(spatial).apply({"params": params}, jnp.asarray(ids), images=images, videos=videos)
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(ids).long(), pixel_values=torch_images(images),
                    pixel_values_videos=torch_videos(videos)).logits.numpy()
    rows = np.abs(np.asarray(ours) - theirs).max(axis=(1, 2))
    error = float(rows.max())
    print(f"max |logits - transformers| (image, video, text rows) = {', '.join(f'{e:.2e}' for e in rows)}")
    assert error <= TOLERANCE, error
    # transformers' own layout imports to the same parameters
    hf_params, hf_layout = jax_params(spatial, reference.numpy_state(hf))
    assert hf_layout == "hf_state_dict"
    jax.tree_util.tree_map(np.testing.assert_array_equal, hf_params, params)


def test_videos_with_temporal_attention_match_the_original_semantics(setup):
    config, spatial, hf, tower, images, videos, ids = setup
    params, _ = jax_params(config, reference.original_state_dict(hf, tower))
    model = video_llava.VideoLlava(config)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), images=images, videos=videos))
    theirs = reference.logits_with_video_tower(hf, tower, torch.from_numpy(ids).long(), torch_images(images),
                                               torch_videos(videos))
    rows = np.abs(ours - theirs).max(axis=(1, 2))
    error = float(rows.max())
    print(f"max |logits - temporal reference| (image, video, text rows) = {', '.join(f'{e:.2e}' for e in rows)}")
    assert error <= TOLERANCE, error
    # the temporal layers matter: the same weights without them give another video row (the image row and the
    # text-only row do not read the video tower)
    without = {**params, "video_tower": jax.tree_util.tree_map(lambda x: x, params["video_tower"])}
    for name, layer in without["video_tower"].items():
        if name.startswith(("layers_", "unused_layers_")):
            without["video_tower"][name] = {k: v for k, v in layer.items() if not k.startswith("temporal")}
    plain = np.asarray(video_llava.VideoLlava(spatial).apply({"params": without}, jnp.asarray(ids), images=images,
                                                            videos=videos))
    assert np.abs(plain[1] - ours[1]).max() > 1e-2
    np.testing.assert_allclose(plain[[0, 2]], ours[[0, 2]], atol=1e-6)


def test_loss_never_scores_a_soft_token(setup):
    config, spatial, hf, _, images, videos, ids = setup
    params, _ = jax_params(spatial, reference.original_state_dict(hf, None))
    model = video_llava.VideoLlava(spatial)
    labels = np.where(np.arange(ids.shape[1]) > config.video_tokens, ids, IGNORE_INDEX)
    batch = dict(input_ids=ids, padding_mask=np.ones_like(ids, bool), labels=labels, images=images, videos=videos)
    loss, count = video_llava.video_llava_loss(model)(params, batch, None)
    leaky = dict(batch, labels=ids)  # labels on every position, soft tokens included
    _, leaky_count = video_llava.video_llava_loss(model)(params, leaky, None)
    soft_positions = int(((ids == config.image_token_id) | (ids == config.video_token_id))[:, 1:].sum())
    assert int(leaky_count) == ids.size - ids.shape[0] - soft_positions
    assert int(count) == int((labels[:, 1:] != IGNORE_INDEX).sum()) and np.isfinite(float(loss))


def test_a_video_of_the_wrong_length_is_refused(setup):
    config, *_ = setup
    model = video_llava.VideoLlava(config)
    with pytest.raises(ValueError, match="exactly num_frames=4"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32),
                                          videos=jnp.zeros((1, 3, 28, 28, 3))))


def test_greedy_generation_matches_transformers(setup):
    """Cached decoding (`infer.generate`) after Video-LLaVA's prompt embeddings gives transformers' `generate`
    tokens, for a video prompt and an image prompt."""
    import functools

    from vllama_jax.infer.generate import GenerationConfig, generate
    from vllama_jax.models.llama import LlamaForCausalLM

    config, spatial, hf, _, images, videos, ids = setup
    params, _ = jax_params(spatial, reference.original_state_dict(hf, None))
    model = video_llava.VideoLlava(spatial)
    cfg = GenerationConfig(max_new_tokens=6, eos_token_id=2, pad_token_id=0)
    run = jax.jit(functools.partial(generate, LlamaForCausalLM(spatial.llm), cfg=cfg))
    hf.generation_config.pad_token_id, hf.generation_config.eos_token_id = 0, 2
    for row, media in ((1, dict(videos=videos)), (0, dict(images=images))):
        prompt = jnp.asarray(ids[row:row + 1, :-5])
        embeds = model.apply({"params": params}, prompt, **media, method=video_llava.VideoLlava.prompt_embeds)
        out = run(params["language_model"], embeds, jnp.ones(prompt.shape, bool))
        tokens = list(np.asarray(out.tokens[0, : int(out.lengths[0])]))
        pixels = ({"pixel_values_videos": torch_videos(videos)} if "videos" in media
                  else {"pixel_values": torch_images(images)})
        with torch.no_grad():
            expected = hf.generate(input_ids=torch.from_numpy(np.array(prompt)).long(), max_new_tokens=6,
                                   do_sample=False, **pixels)[0, prompt.shape[1]:].tolist()
        assert tokens == expected[: len(tokens)] and len(tokens) == len(expected)
