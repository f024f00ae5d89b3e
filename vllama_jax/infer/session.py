"""A trained Video-LLaMA ready to answer: config → tokenizer → sharded parameters → jitted generation.

`load_session(config, ckpt)` reads what training wrote: the frozen weights from `train.frozen_checkpoint` (or
`<ckpt>/frozen`, where the tiny default writes them), the trainable glue from the newest checkpoint of the run
directory `ckpt` (or from a `vllama-convert import --part trainable` output), the tokenizer from
`data.tokenizer` (or `<ckpt>/tokenizer`). Every array is restored straight into its sharding on the config's
mesh, by the same logical-axis rules as training, so a 13B model is served across the devices of a slice.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from vllama_jax import sharded_model, sharding
from vllama_jax.config import model_config
from vllama_jax.constants import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER
from vllama_jax.data.tokenizer import load_tokenizer
from vllama_jax.infer.generate import Generated, GenerationConfig, generate, make_stream, video_llama_prompt
from vllama_jax.models.llama import LlamaForCausalLM
from vllama_jax.models.video_llama import VideoLlama


@dataclasses.dataclass
class Session:
    config: object
    model: VideoLlama
    params: dict
    tokenizer: object
    mesh: object
    rules: list
    # this session's jitted functions, by what they were built for (each compiles once per input shape)
    compiled: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def num_frames(self) -> int:
        return self.config.data.num_frames

    @property
    def image_size(self) -> int:
        return self.model.config.vision.image_size

    def placeholder_counts(self) -> dict[str, int]:
        cfg = self.model.config
        return {IMAGE_PLACEHOLDER: cfg.num_video_query_tokens, AUDIO_PLACEHOLDER: cfg.num_audio_query_tokens}

    def generation_config(self, **overrides) -> GenerationConfig:
        """The tokenizer's EOS and pad ids filled in."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.unk_token_id
        return GenerationConfig(**{"eos_token_id": tok.eos_token_id, "pad_token_id": pad, **overrides})

    def generate(self, input_ids, padding_mask, frames=None, audio=None, cfg: GenerationConfig | None = None,
                 rng=None) -> Generated:
        """Answer a batch of left-padded prompts whose placeholders the media fill (numpy in, device arrays out)."""
        cfg = cfg or self.generation_config()
        key = ("generate", cfg, frames is not None, audio is not None)
        if key not in self.compiled:
            model, llm = self.model, LlamaForCausalLM(self.model.config.llm)

            def run(params, frames, audio_clips, input_ids, padding_mask, rng):
                embeds, mask = video_llama_prompt(model, params, input_ids, padding_mask, frames, audio_clips, "audio")
                return generate(llm, params["llama_model"], embeds, mask, cfg, rng)

            self.compiled[key] = jax.jit(run)
        inputs = self._on_mesh(frames, audio, input_ids, padding_mask)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.compiled[key](self.params, *inputs, rng)

    def prompt_embeddings(self, input_ids, padding_mask, frames=None, audio=None):
        """The LLM's input embeddings for prompts whose placeholders the media fill (for `generate.stream`)."""
        key = ("prompt", frames is not None, audio is not None)
        if key not in self.compiled:
            model = self.model
            self.compiled[key] = jax.jit(lambda p, f, a, i, m: video_llama_prompt(model, p, i, m, f, a))
        inputs = self._on_mesh(frames, audio, input_ids, padding_mask)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.compiled[key](self.params, *inputs)

    def stream(self, embeds, mask, cfg: GenerationConfig, rng=None):
        """`generate.make_stream` on this session's LLM, under its mesh (yields each step's tokens)."""
        key = ("stream", cfg)
        if key not in self.compiled:
            self.compiled[key] = make_stream(LlamaForCausalLM(self.model.config.llm), cfg)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield from self.compiled[key](self.params["llama_model"], embeds, mask, rng)

    def _on_mesh(self, *arrays):
        """Each array (or None) batch-sharded over (data, fsdp) when the batch divides, else replicated (a
        single chat request)."""
        out = []
        for x in arrays:
            if x is not None:
                x = np.asarray(x)
                spec = sharding.batch_sharding(self.mesh, x.ndim, self.rules)
                ways = int(np.prod([self.mesh.shape[a] for a in _axes(spec.spec[0])]))
                x = jax.device_put(x, spec if x.shape[0] % ways == 0 else NamedSharding(self.mesh, PartitionSpec()))
            out.append(x)
        return out


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _ckpt_file(ckpt: Path | None, name: str) -> str:
    if ckpt is not None and (ckpt / name).exists():
        return str(ckpt / name)
    return ""


def load_session(config, ckpt: str | None = None, log=print) -> Session:
    """Build the model of `config` and read its weights (see the module docstring)."""
    ckpt_dir = Path(ckpt) if ckpt else None
    if ckpt_dir is not None and not ckpt_dir.exists():
        raise FileNotFoundError(f"--ckpt {ckpt_dir} does not exist")
    tokenizer_dir = config.data.tokenizer or _ckpt_file(ckpt_dir, "tokenizer")
    if not tokenizer_dir:
        raise FileNotFoundError("no tokenizer: set data.tokenizer or pass a run directory holding tokenizer/")
    tokenizer = load_tokenizer(tokenizer_dir)
    model_cfg = dataclasses.replace(
        model_config(config),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER),
    )
    sharded = sharded_model.from_config(config, model_cfg)
    frozen_dir = config.train.frozen_checkpoint or _ckpt_file(ckpt_dir, "frozen")
    with sharded.on_mesh():
        if not frozen_dir:
            log("frozen weights: random from the seed (no train.frozen_checkpoint and no <ckpt>/frozen)")
        frozen = sharded.load_frozen(frozen_dir, log=lambda *_: None)
        if ckpt_dir is not None:  # a run directory (its newest checkpoint) or a trainable-parameter checkpoint
            try:
                trainable = sharded.load_trainable(str(ckpt_dir))
            except (FileNotFoundError, ValueError) as err:
                raise FileNotFoundError(f"--ckpt {ckpt_dir}: no trainable weights to read ({err})") from err
        else:
            log("trainable weights: random from the seed (no checkpoint given)")
            trainable = sharded.random(sharded.trainable_names)
    params = {**frozen, **trainable}
    model = sharded.module
    if model_cfg.llm.scan_layers:  # decode with one cache per layer: a scanned cache is copied every token
        params["llama_model"] = unstack_decoder(params["llama_model"], model_cfg.llm.num_layers)
        model = VideoLlama(dataclasses.replace(model_cfg, llm=dataclasses.replace(model_cfg.llm, scan_layers=False)))
    return Session(config, model, params, tokenizer, sharded.mesh, sharded.rules)


def unstack_decoder(llm_params: dict, num_layers: int) -> dict:
    """Scanned LLaMA parameters (decoder/layers stacked on a leading axis) in the per-layer layout
    (decoder/layers_{i}); each slice keeps the sharding of its other axes. Decoding from the scanned layout
    moves the whole KV cache through the scan every token: for a 134 M-parameter LLaMA on this CPU, 74.5 against
    156.8 tokens/s at batch 8 and 31.4 against 47.6 at batch 1 (`python -m vllama_jax.bench.decode --scan`
    against the same without --scan)."""
    decoder = dict(llm_params["decoder"])
    stacked = decoder.pop("layers")
    for i in range(num_layers):
        decoder[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    return {**llm_params, "decoder": decoder}


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = row
        mask[i, length - len(row) :] = True
    return ids, mask


def decode_tokens(tokenizer, tokens, length: int) -> str:
    return tokenizer.decode([int(t) for t in np.asarray(tokens)[:length]], skip_special_tokens=True)
