"""The input pipeline: ArrayRecord shards -> grain -> fixed-shape numpy batches for the train step.

    source (random access over all shards) → repeat → global shuffle by seed → decode + transform (rng seeded by
    the global position; lazy) → this host's rows of each global batch → batch → worker processes

Every example has the same shapes, so XLA compiles once: an image is `num_frames` copies of itself with
`frame_mask` [1, 0, …] (the model reads frame 0 only, the original's 1-frame video), a video's mask is all
True but for the repeated last frame that pads a video shorter than `num_frames` (the original reads only its
own frames). A sample that cannot be used does not stop training and is not dropped silently: it becomes an
all-masked example (labels all ignored, `example_mask` False) and its reason code is in `skip_reason`; repairs
(a short video padded by repeating its last frame, a broken audio track replaced by silence, a conversation cut
to length) are flagged in `repairs`. `reason_counts(batch)` turns both into the counters the training metrics
report.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.data import audio, conversation, image, records, text, video


class SkipReason(enum.IntEnum):
    """Why an example was turned into an all-masked one (its `skip_reason`; 0 = a usable example)."""

    NONE = 0
    MEDIA_UNREADABLE = 1
    CAPTION_EMPTY = 2
    CAPTION_NOT_UTF8 = 3
    TEXT_TOO_LONG = 4
    RECORD_CORRUPT = 5


class Repair(enum.IntFlag):
    """What was repaired in a usable example (bits of its `repairs`)."""

    NONE = 0
    FEW_FRAMES_REPEATED = 1
    AUDIO_UNREADABLE_SILENCED = 2
    CONVERSATION_TRUNCATED = 4


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int  # per host
    image_size: int = 224
    num_frames: int = 8  # 1 for image datasets
    frame_sampling: str = "headtail"  # the original train processor's; eval uses uniform
    train: bool = True  # random resized crop (train) or resize only (eval)
    crop_scale: tuple[float, float] = video.TRAIN_CROP_SCALE  # the train crop's area fraction range
    # the train crop's float -> uint8 cast wraps out-of-range values as the original's `.to(torch.uint8)` does;
    # False clips them instead (the clean variant; docs/data.md)
    wrap_uint8: bool = True
    # the clean variant of the video train crop: draw the box on the native-size frames and resize it once,
    # antialiased (video.train_transform_native), instead of the original's crop of frames decoded at image_size²
    crop_native: bool = False
    num_soft_tokens: int = 32
    image_token_id: int = 32000
    text_length: int = 1 + 32 + 32  # BOS + soft tokens + max_txt_len for captions
    max_txt_len: int = 32
    end_sym: str = "\n"
    template: str = "vicuna"  # stage 2's conversation format: "vicuna" (###) or "llama_2" ([INST]); conversation.py
    # Caption prompts (each holding one <ImageHere>), one drawn per example; empty = stage 1's bare layout.
    prompts: tuple[str, ...] = ()
    with_audio: bool = False
    clips_per_video: int = 8
    seed: int = 42
    num_epochs: int | None = None  # None = repeat forever
    worker_count: int = 0  # grain worker processes (0 = decode in this process)
    worker_buffer_size: int = 2
    # grain's reader threads in this process (its default is 16). On few cores with cheap examples (the CPU demo
    # from memory) the thread hand-offs cost more than the decoding they overlap; 0 reads in the calling thread.
    read_threads: int = 16
    # Keep every clip's decoded frames (all of them, at the decode size) in memory after its first read, so later
    # epochs sample and crop from memory instead of decoding again: for a data set that fits (the CPU demo's 960
    # clips of 16 frames at 28 px are 36 MB). The pixels are the ones decoding gives, so the batches are unchanged.
    cache_decoded: bool = False

    def __post_init__(self):
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale {tuple(self.crop_scale)}: the train crop's area fractions must satisfy "
                             f"0 < min <= max <= 1")


class ExampleBuilder(grain.transforms.RandomMap):
    """record bytes + rng -> one fixed-shape example (dict of numpy arrays)."""

    def __init__(self, config: PipelineConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        # (dataset, id) -> (frame count, {index: frame}) with cache_decoded
        self.decoded: dict[tuple[str, str], tuple[int, dict[int, np.ndarray]]] = {}

    def random_map(self, record: bytes, rng: np.random.Generator) -> dict[str, Any]:
        cfg = self.config
        example = self.empty()
        try:
            sample = records.decode(record)
        except Exception as err:  # noqa: BLE001 - any unpacking failure is a corrupt record
            logging.warning("skipping a corrupt record: %s", err)
            example["skip_reason"] = np.int32(SkipReason.RECORD_CORRUPT)
            return example
        name = f"{sample.dataset}:{sample.media_name}"
        try:
            frames, frame_mask, seconds, repaired = self._frames(sample, rng, name)
        except ValueError as err:  # the message names the file and the problem
            logging.warning("skipping %s: %s", name, err)
            example["skip_reason"] = np.int32(SkipReason.MEDIA_UNREADABLE)
            return example
        example["repairs"] |= np.int32(Repair.FEW_FRAMES_REPEATED if repaired else Repair.NONE)
        try:
            tokens = self._text(sample, seconds, rng)
        except _Skip as skip:
            logging.warning("skipping %s: %s", name, skip)
            example["skip_reason"] = np.int32(skip.code)
            return example
        example["repairs"] |= np.int32(Repair.CONVERSATION_TRUNCATED if tokens.pop("truncated", False) else Repair.NONE)
        example.update(tokens, frames=frames, frame_mask=frame_mask, example_mask=np.bool_(True))
        if cfg.with_audio:
            try:
                clips, has_audio = (
                    audio.load_audio_clips(sample.media, cfg.clips_per_video, name=name)
                    if sample.has_audio
                    else (example["audio"], False)
                )
            except ValueError as err:
                logging.warning("silencing the audio of %s: %s", name, err)
                clips, has_audio = example["audio"], False
                example["repairs"] |= np.int32(Repair.AUDIO_UNREADABLE_SILENCED)
            example.update(audio=clips, audio_mask=np.bool_(has_audio))
        return example

    def empty(self) -> dict[str, Any]:
        """An all-masked example of the usual shapes (what an unusable sample becomes)."""
        cfg = self.config
        size = cfg.image_size
        out = {
            "frames": np.zeros((cfg.num_frames, size, size, 3), np.float32),
            "frame_mask": np.ones(cfg.num_frames, bool),
            "input_ids": np.full(cfg.text_length, self.tokenizer.pad_token_id, np.int32),
            "padding_mask": np.zeros(cfg.text_length, bool),
            "labels": np.full(cfg.text_length, IGNORE_INDEX, np.int32),
            "example_mask": np.bool_(False),
            "skip_reason": np.int32(SkipReason.NONE),
            "repairs": np.int32(Repair.NONE),
        }
        # a skipped example still needs its placeholders, so the model's splice sees the usual layout
        out["input_ids"][1 : 1 + cfg.num_soft_tokens] = cfg.image_token_id
        if cfg.with_audio:
            out["audio"] = np.zeros((cfg.clips_per_video, 1, audio.NUM_MEL_BINS, audio.TARGET_FRAMES), np.float32)
            out["audio_mask"] = np.bool_(False)
        return out

    def _frames(self, sample: records.Sample, rng, name: str):
        cfg = self.config
        if sample.kind == "image":  # the original's BLIP-2 image processors, on Pillow
            one = (
                image.train_image(sample.media, rng, cfg.image_size, cfg.crop_scale, name)
                if cfg.train
                else image.eval_image(sample.media, cfg.image_size, name)
            )
            # copies keep the shapes fixed; the frame mask says the model reads frame 0 alone
            frames = np.repeat(one[None], cfg.num_frames, axis=0)
            return frames.astype(np.float32), np.arange(cfg.num_frames) < 1, [], False
        picked = {}

        def pick(count):  # decord's frame count, from the file itself (not the record's, possibly an old estimate)
            picked["indices"], picked["real"] = video.sample_indices_padded(count, cfg.num_frames, cfg.frame_sampling,
                                                                            rng)
            return picked["indices"]

        native = cfg.train and cfg.crop_native
        raw = self._decode(sample, pick, None if native else cfg.image_size, name)
        indices, real = picked["indices"], picked["real"]
        if native:
            frames = video.train_transform_native(raw, rng, cfg.image_size, cfg.crop_scale)
        elif cfg.train:
            frames = video.train_transform(raw, rng, cfg.image_size, cfg.crop_scale, cfg.wrap_uint8)
        else:
            frames = video.eval_transform(raw, cfg.image_size)
        # a short video's repeated last frame only keeps the shapes fixed: the model reads the real frames alone
        # (the original's min(n_frms, vlen) frames of a short video)
        frame_mask = np.arange(cfg.num_frames) < real
        fps = sample.fps or 1.0
        return frames.astype(np.float32), frame_mask, [float(i) / fps for i in indices[:real]], real < cfg.num_frames

    def _decode(self, sample: records.Sample, pick, size: int | None, name: str) -> np.ndarray:
        """The frames `pick(frame count)` chooses (uint8, decoded at size² as decord does, or native size when None),
        decoded now or, with `cache_decoded`, kept frame by frame: every frame of the clip on its first read, or,
        where not every frame decodes, each frame once it has been asked for (a frame that does not decode fails
        every time, as without the cache)."""
        if not self.config.cache_decoded:
            return video.read_sampled(sample.media, pick, size, name)[0]
        key = (sample.dataset, sample.id)
        if key not in self.decoded:
            try:
                frames, every, _ = video.read_sampled(sample.media, range, size, name)
                self.decoded[key] = (len(every), dict(zip(every, frames)))
            except ValueError:
                self.decoded[key] = (video.count_frames(sample.media, name), {})
        count, cache = self.decoded[key]
        wanted = [int(i) for i in np.asarray(pick(count)).reshape(-1)]
        missing = sorted(set(wanted) - cache.keys())
        if missing:
            cache.update(zip(missing, video.read_frames_seeking(sample.media, missing, size, name=name)[0]))
        return np.stack([cache[i] for i in wanted])

    def _text(self, sample: records.Sample, seconds: list[float], rng) -> dict[str, np.ndarray]:
        cfg = self.config
        if sample.conversation is not None:
            try:
                turns = [
                    {"from": t["from"].decode("utf-8"), "value": t["value"].decode("utf-8")}
                    for t in sample.conversation
                ]
            except UnicodeDecodeError:
                raise _Skip(SkipReason.CAPTION_NOT_UTF8) from None
            try:
                out = conversation.training_example(
                    self.tokenizer,
                    turns,
                    cfg.template,
                    length=cfg.text_length,
                    media_kind=sample.kind,
                    num_soft_tokens=cfg.num_soft_tokens,
                    frame_seconds=seconds if sample.kind == "video" else None,
                )
            except ValueError:  # roles out of order for the template, or an unknown role
                raise _Skip(SkipReason.TEXT_TOO_LONG) from None
            if (out["input_ids"] == cfg.image_token_id).sum() != cfg.num_soft_tokens or (
                out["labels"] == IGNORE_INDEX
            ).all():
                raise _Skip(SkipReason.TEXT_TOO_LONG)
            return out
        try:
            caption = text.clean_caption((sample.caption or b"").decode("utf-8"))
        except UnicodeDecodeError:
            raise _Skip(SkipReason.CAPTION_NOT_UTF8) from None
        if not caption:
            raise _Skip(SkipReason.CAPTION_EMPTY)
        prompt = cfg.prompts[int(rng.integers(len(cfg.prompts)))] if cfg.prompts else None
        try:
            return text.caption_example(
                self.tokenizer,
                caption,
                num_soft_tokens=cfg.num_soft_tokens,
                image_token_id=cfg.image_token_id,
                max_txt_len=cfg.max_txt_len,
                end_sym=cfg.end_sym,
                prompt=prompt,
                length=cfg.text_length,
            )
        except ValueError:  # prompt + caption longer than text_length
            raise _Skip(SkipReason.TEXT_TOO_LONG) from None


class _Skip(Exception):
    def __init__(self, code: SkipReason):
        super().__init__(code.name.lower())
        self.code = code


class ProcessSlice:
    """This process's part of each global batch, as a random-access view: local element j of process p is
    global element (j // b) · (b · P) + p · b + j % b (b = per-process batch, P = process count). Process
    p's rows therefore sit at rows p·b … p·b + b − 1 of every global batch, the layout
    `jax.make_array_from_process_local_data` assembles, so a multi-host run sees the single-host batches."""

    def __init__(self, dataset, process_index: int, process_count: int, local_batch: int):
        self.dataset, self.index, self.count, self.local_batch = dataset, process_index, process_count, local_batch

    def __len__(self):
        return len(self.dataset) // (self.local_batch * self.count) * self.local_batch

    def __getitem__(self, j):
        b = self.local_batch
        return self.dataset[(j // b) * b * self.count + self.index * b + j % b]


def make_dataset(
    shard_paths: Sequence[str],
    config: PipelineConfig,
    tokenizer,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The per-host iterable of batches. Each host reads a disjoint slice of one global shuffled order
    (by default this JAX process's slice: `jax.process_index()` of `jax.process_count()`); every example's
    random transform is seeded by its global position, so the global batches do not depend on the host count."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    source = grain.sources.ArrayRecordDataSource(list(shard_paths))
    ds = grain.MapDataset.source(source)
    if config.num_epochs != 1:
        ds = ds.repeat(config.num_epochs)
    ds = ds.shuffle(seed=config.seed)
    ds = ds.random_map(ExampleBuilder(config, tokenizer), seed=config.seed + 1)  # lazy: only this host's examples run
    ds = grain.MapDataset.source(ProcessSlice(ds, process_index, process_count, config.batch_size))
    ds = ds.batch(config.batch_size, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads))
    if config.worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app nobody parsed them
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size
            )
        )
    return it


class _PadToBatches:
    """A random-access view of `dataset` lengthened to a multiple of `multiple` by `empty()` examples."""

    def __init__(self, dataset, multiple: int, empty):
        self.dataset, self.empty = dataset, empty
        self.length = -(-len(dataset) // multiple) * multiple

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.dataset[i] if i < len(self.dataset) else self.empty()


def make_single_pass(
    shard_paths: Sequence[str],
    config: PipelineConfig,
    tokenizer,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Every record once, in shard order, as this host's rows of whole global batches: the last global batch
    is filled up with all-masked examples (`example_mask` False, reason code 0) rather than dropped, so a pass
    that must see every example (the frozen-feature cache) loses none."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    builder = ExampleBuilder(config, tokenizer)
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(list(shard_paths)))
    ds = ds.random_map(builder, seed=config.seed + 1)
    ds = grain.MapDataset.source(_PadToBatches(ds, config.batch_size * process_count, builder.empty))
    ds = grain.MapDataset.source(ProcessSlice(ds, process_index, process_count, config.batch_size))
    return ds.batch(config.batch_size).to_iter_dataset()


def reason_counts(batch: dict[str, np.ndarray]) -> dict[str, int]:
    """{'skipped/<reason>': n, 'repaired/<what>': n, 'examples': n} for a batch, for the training metrics."""
    counts = {"examples": int(np.asarray(batch["example_mask"]).sum())}
    skip = np.asarray(batch["skip_reason"])
    for reason in SkipReason:
        if reason is not SkipReason.NONE:
            counts[f"skipped/{reason.name.lower()}"] = int((skip == reason).sum())
    repairs = np.asarray(batch["repairs"])
    for repair in Repair:
        if repair is not Repair.NONE:
            counts[f"repaired/{repair.name.lower()}"] = int(((repairs & repair) != 0).sum())
    return counts
