"""The audio branch against the real ImageBind code (imagebind-unofficial, see imagebind_reference.py) and
transformers' Blip2QFormerModel, fp32, max abs diff <= 1e-5; full sizes by shape; a real mp4 end to end."""
import dataclasses
import re
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vllama_jax.testing import torch_reference as ref
from vllama_jax.testing import imagebind_reference as ib_ref
from vllama_jax.config import load_config, model_config
from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.convert import imagebind as ib_map
from vllama_jax.convert.mapping import flatten, torch_shape
from vllama_jax.convert.video_llama import (UNUSED_KEYS, export_state_dict, load_state_dict, scanned_subtrees,
                                            video_llama_rules)
from vllama_jax.data import audio
from vllama_jax.data.synthetic import write_test_video
from vllama_jax.models.imagebind import ImageBindEncoder
from vllama_jax.models.video_llama import AUDIO_TRAINABLE, VideoLlama, causal_lm_loss, count_params, init_params

TOL = 1e-5
AUDIO_PREFIXES = ("audio_encoder.", "audio_position_embedding.", "audio_Qformer.", "audio_query_tokens", "audio_llama_proj.")


def report(name, err):
    print(f"[parity] {name}: max abs diff {err:.2e}")
    assert err <= TOL, f"{name}: {err}"


@pytest.fixture(scope="module")
def tiny_imagebind():
    return ib_ref.tiny_imagebind(seed=0)


@pytest.mark.parametrize("scan", [False, True])
def test_imagebind_towers_match_the_original(tiny_imagebind, scan):
    torch_model, audio_cfg, vision_cfg = tiny_imagebind
    audio_cfg = dataclasses.replace(audio_cfg, scan_layers=scan)
    vision_cfg = dataclasses.replace(vision_cfg, scan_layers=scan)
    encoder = ImageBindEncoder(audio_cfg, vision_cfg)
    rng = np.random.default_rng(0)
    fbank = rng.standard_normal((2, 3, 128, 204)).astype(np.float32)
    frames = rng.standard_normal((2, 2, 224, 224, 3)).astype(np.float32)
    abstract = jax.eval_shape(lambda: {
        **encoder.init(jax.random.key(0), fbank, "audio")["params"],
        **encoder.init(jax.random.key(0), frames, "vision")["params"]})
    scanned = [(f"{m}/blocks", 2) for m in ("audio", "vision")] if scan else []
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    params = load_state_dict(state, ib_map.imagebind_rules(audio_cfg, vision_cfg), abstract, scanned,
                             ignore=ib_map.UNUSED_KEYS)
    with torch.no_grad():
        t_feature, t_embedding = ib_ref.get_audio_feature(torch_model, torch.from_numpy(fbank)[:, :, None], "audio")
        t_vfeature, t_vembedding = ib_ref.get_audio_feature(
            torch_model, torch.from_numpy(frames).permute(0, 1, 4, 2, 3).contiguous(), "vision")
    feature, embedding = encoder.apply({"params": params}, fbank, "audio")
    vfeature, vembedding = encoder.apply({"params": params}, frames, "vision")
    assert feature.shape == (2, 3, 32) and embedding.shape == (2, 3, 48)
    report(f"ImageBind audio head-LN CLS (scan={scan})", ref.max_abs(feature, t_feature))
    report(f"ImageBind audio embedding x20 (scan={scan})", ref.max_abs(embedding, t_embedding))
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=-1), 20.0, rtol=1e-5)
    report(f"ImageBind vision head-LN CLS (scan={scan})", ref.max_abs(vfeature, t_vfeature))
    report(f"ImageBind vision embedding (scan={scan})", ref.max_abs(vembedding, t_vembedding))
    np.testing.assert_allclose(np.linalg.norm(vembedding, axis=-1), 1.0, rtol=1e-5)  # no logit scale for vision


def test_drop_path_only_in_training_and_only_where_the_original_has_it(tiny_imagebind):
    torch_model, audio_cfg, vision_cfg = tiny_imagebind
    encoder = ImageBindEncoder(audio_cfg, vision_cfg)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 2, 128, 204)).astype(np.float32)
    frames = rng.standard_normal((4, 2, 224, 224, 3)).astype(np.float32)
    params = {**encoder.init(jax.random.key(0), x, "audio")["params"],
              **encoder.init(jax.random.key(0), frames, "vision")["params"]}
    run = lambda inputs, modality, det, seed: np.asarray(encoder.apply(  # noqa: E731
        {"params": params}, inputs, modality, deterministic=det, rngs={"dropout": jax.random.key(seed)})[0])
    assert np.array_equal(run(x, "audio", True, 0), run(x, "audio", True, 1))
    assert not np.allclose(run(x, "audio", False, 0), run(x, "audio", True, 0))  # block 1 of 2 drops at rate 0.1
    # the original's vision trunk has no drop path (imagebind_model.py builds it with drop_path=0.0)
    assert all(isinstance(b.drop_path, torch.nn.Identity) for b in torch_model.modality_trunks["vision"].blocks)
    assert vision_cfg.drop_path == 0.0
    np.testing.assert_array_equal(run(frames, "vision", False, 0), run(frames, "vision", True, 0))


@pytest.mark.parametrize("scan", [False, True])
def test_drop_path_rate_of_block_i_is_the_originals_linspace(scan):
    """Block i drops its residual branches with probability drop_path · i / (L − 1): measured per block over 4000
    samples, against the per-block rates of the real ImageBind's audio trunk (torch.linspace(0, 0.1, L))."""
    from vllama_jax.models.imagebind import ImageBindTower

    num_blocks, samples = 5, 4000
    torch_model, audio_cfg, _ = ib_ref.tiny_imagebind(seed=0, audio_num_blocks=num_blocks)
    expected = [getattr(b.drop_path, "drop_prob", 0.0) for b in torch_model.modality_trunks["audio"].blocks]
    np.testing.assert_allclose(expected, np.linspace(0, 0.1, num_blocks), atol=1e-7)
    # a 2 × 2-patch input keeps 4000 samples cheap; the rate does not depend on the input size
    cfg = dataclasses.replace(audio_cfg, input_size=(26, 26), width=16, num_heads=2, mlp_dim=32, out_dim=8)
    tower = ImageBindTower(dataclasses.replace(cfg, scan_layers=False))
    x = np.random.default_rng(2).standard_normal((samples, 26, 26)).astype(np.float32)
    base = jax.tree_util.tree_map(np.asarray, nn.unbox(tower.init(jax.random.key(0), x[:1])["params"]))
    zero = lambda tree: jax.tree_util.tree_map(np.zeros_like, tree)  # noqa: E731

    def only_attention_of(block):
        """Every residual branch zero but block `block`'s attention: a sample's output equals the all-zero
        tower's exactly when that branch was dropped."""
        params = dict(base)
        for i in range(num_blocks):
            params[f"blocks_{i}"] = {**base[f"blocks_{i}"], "fc2": zero(base[f"blocks_{i}"]["fc2"])}
            if i != block:
                attn = base[f"blocks_{i}"]["attn"]
                params[f"blocks_{i}"]["attn"] = {**attn, "out_proj": zero(attn["out_proj"])}
        if scan:  # the scanned layout: one `blocks` subtree, a leading layers axis
            stacked = [params.pop(f"blocks_{i}") for i in range(num_blocks)]
            params["blocks"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *stacked)
        return params

    model = ImageBindTower(dataclasses.replace(cfg, scan_layers=scan))
    run = jax.jit(lambda p, det: model.apply({"params": p}, x, det, rngs={"dropout": jax.random.key(3)})[0],
                  static_argnums=1)
    all_zero = np.asarray(run(only_attention_of(-1), True))
    measured = []
    for block in range(num_blocks):
        trained = np.asarray(run(only_attention_of(block), False))
        measured.append(float(np.all(trained == all_zero, axis=-1).mean()))
    print(f"[drop path] per-block drop rate (scan={scan}): measured {np.round(measured, 4)}, original {np.round(expected, 4)}")
    assert measured[0] == 0.0  # block 0 never drops
    np.testing.assert_allclose(measured, expected, atol=0.02)  # 4000 samples: std ≤ 0.005


def _patched_init():
    """Build the full-size original without spending a minute initialising 1.2 B random weights."""
    names = ["kaiming_uniform_", "uniform_", "xavier_uniform_", "xavier_normal_", "normal_", "constant_", "trunc_normal_"]
    return [mock.patch(f"torch.nn.init.{n}", lambda t, *a, **k: t) for n in names]


def test_full_size_imagebind_and_audio_glue_by_shape():
    """The full-size towers and audio glue by jax.eval_shape, against SPEC's counts and the real imagebind_huge's
    every tensor shape (every key of it mapped or dropped on purpose)."""
    cfg = model_config(load_config("configs/video_llama.py:llama2_7b_chat,audio_stage1"))
    params = nn.unbox(jax.eval_shape(lambda: init_params(VideoLlama(cfg), jax.random.key(0))))
    audio_tower = flatten(params["audio_encoder"]["audio"])
    assert sum(int(np.prod(v.shape)) for k, v in audio_tower.items() if k != "log_logit_scale") == 86_235_648
    assert audio_tower["log_logit_scale"].shape == ()  # the fixed buffer, kept so the file round-trips
    assert count_params(params, ("audio_Qformer",)) == 19_691_520
    assert count_params(params, AUDIO_TRAINABLE) == 19_691_520 + 8 * 768 + 8 * 1024 + 768 * 4096 + 4096
    assert params["audio_encoder"]["vision"]["blocks"]["attn"]["query"]["kernel"].dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params["audio_Qformer"]))
    model = VideoLlama(cfg)
    for inputs, modality in (((1, 8, 1, 128, 204), "audio"), ((1, 8, 224, 224, 3), "vision")):
        soft = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, modality, method=VideoLlama.encode_audio),
                              params, jax.ShapeDtypeStruct(inputs, jnp.float32))
        assert soft.shape == (1, 8, 4096), (modality, soft.shape)

    patches = _patched_init()
    for p in patches:
        p.start()
    try:
        huge = ib_ref.imagebind_model().imagebind_huge()
    finally:
        for p in patches:
            p.stop()
    real = {k: tuple(v.shape) for k, v in huge.state_dict().items()}
    assert sum(int(np.prod(s)) for k, s in real.items() if ".vision." in k) == sum(
        int(np.prod(v.shape)) for v in flatten(params["audio_encoder"]["vision"]).values())
    shapes = {f"audio_encoder/{k}": v.shape for k, v in flatten(params["audio_encoder"]).items()}
    shapes = {k: v for k, v in _unscanned(shapes, cfg).items()}
    rules = [r for r in video_llama_rules(cfg) if r.source.startswith("audio_encoder.")]
    mapped = set()
    for rule in rules:
        key = rule.source.removeprefix("audio_encoder.")
        mapped.add(key)
        if rule.transform.startswith("split3"):
            piece = "linear" if rule.transform == "split3" else "bias"
            want = torch_shape(piece, shapes[rule.targets[0]])
            want = (3 * want[0], *want[1:])
        else:
            want = torch_shape(rule.transform, shapes[rule.target])
        assert real[key] == want, key
    unused = [k for k in real if k not in mapped]
    assert unused and all(re.fullmatch(p, k) for k in unused for p in ib_map.UNUSED_KEYS)
    assert {k.split(".")[1] for k in unused} == {"text", "depth", "thermal", "imu"}


def _unscanned(shapes, cfg):
    out = {}
    for key, shape in shapes.items():
        for path, count in scanned_subtrees(cfg):
            if key.startswith(path + "/"):
                for i in range(count):
                    out[f"{path}_{i}/{key[len(path) + 1:]}"] = shape[1:]
                break
        else:
            out[key] = shape
    return out


class TorchAudioBranch(torch.nn.Module):
    """The original `encode_audioQformer` composed from the real parts: ImageBind's `get_audio_feature` → +
    nn.Embedding(8, 1024-analog) → Q-Former (transformers' Blip2QFormerModel) → Linear."""

    def __init__(self, imagebind, embed_dim, hidden, llm_hidden, num_queries):
        super().__init__()
        self.audio_encoder = imagebind
        self.audio_position_embedding = torch.nn.Embedding(8, embed_dim)
        self.audio_Qformer = ref.qformer_model(hidden=hidden, layers=2, encoder_width=embed_dim, freq=1, seed=3)
        self.audio_query_tokens = torch.nn.Parameter(0.02 * torch.randn(1, num_queries, hidden))
        self.audio_llama_proj = torch.nn.Linear(hidden, llm_hidden)

    def forward(self, inputs, modality):
        _, embedding = ib_ref.get_audio_feature(self.audio_encoder, inputs, modality)
        embedding = embedding + self.audio_position_embedding(torch.arange(inputs.shape[1]))[None]
        query = self.audio_query_tokens.expand(inputs.shape[0], -1, -1)
        hidden = self.audio_Qformer(query_embeds=query, encoder_hidden_states=embedding).last_hidden_state
        return self.audio_llama_proj(hidden)

    def original_state_dict(self):
        state = {f"audio_encoder.{k}": v.numpy() for k, v in self.audio_encoder.state_dict().items()}
        state.update(ref.qformer_state_dict(self.audio_Qformer, prefix="audio_Qformer."))
        for name in ("audio_position_embedding.weight", "audio_query_tokens", "audio_llama_proj.weight", "audio_llama_proj.bias"):
            state[name] = self.state_dict()[name].numpy()
        return state


@pytest.fixture(scope="module")
def audio_model(tiny_config, tiny_imagebind):
    """Tiny Video-LLaMA with the audio branch sized like the tiny real ImageBind, and its PyTorch twin."""
    torch_imagebind, audio_cfg, vision_cfg = tiny_imagebind
    base = model_config(tiny_config)
    cfg = dataclasses.replace(
        base, equip_audio_branch=True, imagebind_audio=audio_cfg, imagebind_vision=vision_cfg,
        num_audio_query_tokens=8,
        image_token_id=510, audio_token_id=511)
    torch.manual_seed(5)
    torch_branch = TorchAudioBranch(torch_imagebind, 48, base.audio_qformer.hidden_size, base.llm.hidden_size, 8).eval()
    model = VideoLlama(cfg)
    params = jax.jit(lambda: nn.unbox(init_params(model, jax.random.key(0))))()
    params = jax.tree_util.tree_map(np.asarray, params)
    audio_names = [k for k in params if k.startswith("audio_")]
    rules = [r for r in video_llama_rules(cfg) if r.source.startswith(AUDIO_PREFIXES)]
    scanned = [s for s in scanned_subtrees(cfg) if s[0].startswith("audio_")]
    loaded = load_state_dict(torch_branch.original_state_dict(), rules, {k: params[k] for k in audio_names}, scanned,
                             ignore=UNUSED_KEYS)
    return cfg, model, {**params, **loaded}, torch_branch


@pytest.mark.parametrize("modality", ["audio", "vision"])
def test_audio_soft_tokens_match_the_original_branch(audio_model, modality):
    cfg, model, params, torch_branch = audio_model
    rng = np.random.default_rng(2)
    if modality == "audio":  # 8 fbank clips, as the original's (B, 8, 1, 128, 204)
        inputs = rng.standard_normal((2, 8, 1, 128, 204)).astype(np.float32)
        t_inputs = torch.from_numpy(inputs)
    else:  # the audio stages: 8 frames through ImageBind's vision tower
        inputs = rng.standard_normal((2, 8, 224, 224, 3)).astype(np.float32)
        t_inputs = torch.from_numpy(inputs).permute(0, 1, 4, 2, 3).contiguous()
    ours = model.apply({"params": params}, inputs, modality, method=VideoLlama.encode_audio)
    with torch.no_grad():
        theirs = torch_branch(t_inputs, modality).numpy()
    assert ours.shape == (2, 8, cfg.llm.hidden_size)
    report(f"audio soft tokens from {modality}", ref.max_abs(ours, theirs))


def test_an_image_batched_as_masked_frames_is_the_originals_one_frame_clip(audio_model):
    """The audio stages read an image through ImageBind's vision tower as the original's T = 1 clip (audio
    position 0, one embedding): batched as 4 copies with frame_mask [1, 0, 0, 0] it gives the same soft tokens."""
    cfg, model, params, torch_branch = audio_model
    image = np.random.default_rng(5).standard_normal((1, 1, 224, 224, 3)).astype(np.float32)
    copies, mask = np.repeat(image, 4, axis=1), np.array([[True, False, False, False]])
    with torch.no_grad():
        theirs = torch_branch(torch.from_numpy(image).permute(0, 1, 4, 2, 3).contiguous(), "vision").numpy()
    one = model.apply({"params": params}, image, "vision", method=VideoLlama.encode_audio)
    masked = model.apply({"params": params}, copies, "vision", frame_mask=mask, method=VideoLlama.encode_audio)
    unmasked = model.apply({"params": params}, copies, "vision", method=VideoLlama.encode_audio)
    assert ref.max_abs(masked, one) <= 1e-6
    report("audio soft tokens of an image as 4 masked frames vs the original's 1 frame", ref.max_abs(masked, theirs))
    assert ref.max_abs(unmasked, one) > 1e-4  # without the mask the copies (and their positions) count
    # the training path: frames to the audio branch with the batch's frame_mask (VideoLlama.encode routes it)
    soft = model.apply({"params": params}, None, copies, "vision", frame_mask=mask, method=VideoLlama.encode)
    np.testing.assert_array_equal(soft["audio"], masked)


def test_real_mp4_audio_track_to_caption_loss(audio_model, tmp_path):
    """A generated mp4 with an AAC tone → fbank clips → ImageBind audio tower → audio Q-Former → soft tokens at
    the `<AudioHere>` tokens → LLM loss; gradients reach the audio glue and only it."""
    cfg, model, params, _ = audio_model
    path = write_test_video(tmp_path / "tone.mp4", num_frames=40, fps=8, tone_hz=660.0)
    clips, has_audio = audio.load_audio_clips(path, clips_per_video=8)
    assert has_audio and clips.shape == (8, 1, 128, 204)
    ids = np.array([[1, *[cfg.audio_token_id] * 8, 20, 21, 22, 23, 2]], np.int32)
    labels = np.where(np.arange(ids.shape[1]) > 8, ids, IGNORE_INDEX)
    trainable = {k: params[k] for k in AUDIO_TRAINABLE}
    frozen = {k: v for k, v in params.items() if k not in AUDIO_TRAINABLE}

    def loss_fn(trainable, fbank):
        logits, soft = model.apply({"params": {**frozen, **trainable}}, None, ids, audio=fbank)
        return causal_lm_loss(logits, labels)[0], soft

    (loss, soft), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, clips[None])
    assert np.isfinite(float(loss)) and set(soft) == {"audio"} and soft["audio"].shape == (1, 8, cfg.llm.hidden_size)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))
    silent, _ = loss_fn(trainable, np.zeros_like(clips)[None])
    assert abs(float(silent) - float(loss)) > 1e-6  # the sound reaches the loss


def test_audio_branch_round_trips_through_the_original_layout(audio_model):
    """Import and export of the audio-branch keys (ImageBind's packed in_proj, bias_k/v, the Conv3d stem, the
    logit-scale buffer) are exact, key for key."""
    cfg, _, params, torch_branch = audio_model
    state = torch_branch.original_state_dict()
    rules = [r for r in video_llama_rules(cfg) if r.source.startswith(AUDIO_PREFIXES)]
    exported = export_state_dict({k: v for k, v in params.items() if k.startswith("audio_")}, rules,
                                 [p for p, _ in scanned_subtrees(cfg) if p.startswith("audio_")])
    kept = {k: v for k, v in state.items() if not any(re.fullmatch(p, k) for p in UNUSED_KEYS)}
    assert exported.keys() == kept.keys()
    for key, value in kept.items():
        assert exported[key].shape == value.shape and np.array_equal(exported[key], value), key


CONFIG_FILE = '''
from vllama_jax.config import load_config


def get_config(arg=""):
    """tiny,audio_stage1 sized like vllama_jax/testing/imagebind_reference.py (vision at the 224 px the original code fixes)."""
    config = load_config("{repo}/configs/video_llama.py:tiny,audio_stage1")
    config.model.imagebind_vision.input_size = (224, 224)
    config.model.imagebind_audio.width, config.model.imagebind_audio.mlp_dim = 32, 128  # the reference's sizes
    config.model.num_audio_query_tokens = 8
    return config
'''


def test_vllama_convert_imports_and_exports_imagebind_huge_pth(repo_root, tmp_path, audio_model):
    """An `imagebind_huge.pth`-layout file (all six modalities, as the real one) plus a Video-LLaMA audio-branch
    checkpoint (`{'model': audio_*}`, the original's `ckpt_2`) → `vllama-convert import` → orbax → `export`
    gives every tensor back bit for bit under the original keys; the four unused modalities are reported as
    dropped; a wrong-shaped tensor is refused by name and nothing is written."""
    import orbax.checkpoint as ocp

    from test_convert_cli import as_torch, convert

    _, _, _, torch_branch = audio_model
    config = tmp_path / "audio_config.py"
    config.write_text(CONFIG_FILE.format(repo=repo_root))
    state = {k: v.clone() for k, v in torch_branch.audio_encoder.state_dict().items()}
    torch.save(state, tmp_path / "imagebind_huge.pth")
    glue = {k: v for k, v in torch_branch.original_state_dict().items() if not k.startswith("audio_encoder.")}
    torch.save({"model": as_torch(glue)}, tmp_path / "audio_branch.pth")
    out = tmp_path / "imagebind_orbax"
    part = "audio_encoder,audio_position_embedding,audio_Qformer,audio_query_tokens,audio_llama_proj"
    result = convert(repo_root, "import", f"--config={config}", "--part", part, "--out", out,
                     "--source", tmp_path / "imagebind_huge.pth", "--source", tmp_path / "audio_branch.pth")
    assert re.search(r"dropped on purpose from \S*imagebind_huge.pth: \d+ keys", result.stdout), result.stdout
    assert re.search(r"audio_encoder\s+[\d,]+\s+[\d.]+\s+float32\s+<- imagebind_huge.pth", result.stdout), result.stdout
    assert re.search(r"audio_Qformer\s+[\d,]+\s+[\d.]+\s+float32\s+<- audio_branch.pth", result.stdout), result.stdout
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(out.absolute())
    assert sorted(restored) == sorted(part.split(",")) and sorted(restored["audio_encoder"]) == ["audio", "vision"]

    exported = tmp_path / "exported.pth"
    convert(repo_root, "export", f"--config={config}", "--params", out, "--out", exported)
    back = torch.load(exported, weights_only=True)["model"]
    kept = {f"audio_encoder.{k}": v for k, v in state.items() if not any(re.fullmatch(p, k) for p in ib_map.UNUSED_KEYS)}
    kept.update(as_torch({k: v for k, v in glue.items() if not any(re.fullmatch(p, k) for p in UNUSED_KEYS)}))
    assert back.keys() == kept.keys()
    for key, value in kept.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key

    state["modality_trunks.audio.blocks.1.attn.bias_k"] = torch.zeros(1, 1, 31)
    torch.save(state, tmp_path / "bad.pth")
    bad = convert(repo_root, "import", f"--config={config}", "--part", "audio_encoder", "--out", tmp_path / "bad_out",
                  "--source", tmp_path / "bad.pth", ok=False)
    assert "audio_encoder.modality_trunks.audio.blocks.1.attn.bias_k" in bad.stderr and "(1, 1, 31)" in bad.stderr
    assert not (tmp_path / "bad_out").exists()


def test_audio_visual_prompt_carries_both_blocks_in_the_original_order(audio_model, tokenizer):
    """The original audio-video demo's message (audio block, then `<Video>` block) with both branches' soft tokens:
    each placeholder run receives its own branch's tokens, in order; audio-only and video-only inputs work too."""
    from vllama_jax.data import text

    cfg, model, params, _ = audio_model
    cfg = dataclasses.replace(cfg, image_token_id=tokenizer.convert_tokens_to_ids("<ImageHere>"),
                              audio_token_id=tokenizer.convert_tokens_to_ids("<AudioHere>"))
    model = VideoLlama(cfg)
    message = text.audio_video_message(cfg.num_audio_query_tokens, cfg.num_video_query_tokens)
    assert message.index("<AudioHere>") < message.index("<Video><ImageHere>")
    ids = np.array([[tokenizer.bos_token_id] + tokenizer(message, add_special_tokens=False)["input_ids"]], np.int32)
    assert (ids == cfg.audio_token_id).sum() == 8 and (ids == cfg.image_token_id).sum() == cfg.num_video_query_tokens
    rng = np.random.default_rng(3)
    frames = rng.standard_normal((1, 2, 28, 28, 3)).astype(np.float32)
    fbank = rng.standard_normal((1, 8, 1, 128, 204)).astype(np.float32)
    soft = model.apply({"params": params}, frames, fbank, method=VideoLlama.encode)
    embeds = np.asarray(model.apply({"params": params}, ids, soft["video"], soft["audio"], method=VideoLlama.splice))
    np.testing.assert_array_equal(embeds[0, ids[0] == cfg.audio_token_id], soft["audio"][0])
    np.testing.assert_array_equal(embeds[0, ids[0] == cfg.image_token_id], soft["video"][0])
    both, _ = model.apply({"params": params}, frames, ids, audio=fbank)
    video_only, _ = model.apply({"params": params}, frames, ids)
    assert both.shape == video_only.shape and not np.allclose(both, video_only)
    # audio only: a prompt with the audio block alone (no <ImageHere>, no frames), and the logits hear the sound
    heard_text = tokenizer(" the cat sat on the mat", add_special_tokens=False)["input_ids"]
    audio_ids = np.array([[tokenizer.bos_token_id, *[cfg.audio_token_id] * cfg.num_audio_query_tokens, *heard_text]], np.int32)
    assert not (audio_ids == cfg.image_token_id).any()
    audio_only, soft_only = model.apply({"params": params}, None, audio_ids, audio=fbank)
    silent, _ = model.apply({"params": params}, None, audio_ids, audio=np.zeros_like(fbank))
    assert set(soft_only) == {"audio"} and audio_only.shape == (1, audio_ids.shape[1], cfg.llm.vocab_size)
    moved = np.abs(np.asarray(audio_only) - np.asarray(silent)).max(axis=-1)[0]
    assert moved[0] == 0 and (moved[1:] > 1e-4).all()  # causal: from the first audio token on, every position
    image = model.apply({"params": params}, frames[:, :1], method=VideoLlama.encode_video)  # an image: one frame
    assert image.shape == (1, cfg.num_video_query_tokens, cfg.llm.hidden_size)
