"""One preprocessing path per modality: every entry point gives identical arrays (difference 0.0) on the same file.

Entry points: `data.media` (what `vllama-chat` calls), `media.item_inputs` (what `vllama-caption`'s `read_item` calls,
on a folder's file and on a shard's bytes), the grain pipeline in eval mode (`ExampleBuilder`), and the feature
cache's reading of it (`feature_cache.reading_config`). chat.py and caption.py are checked by their source: both
define absl flags at import, which clash in one test process."""
import ast
from pathlib import Path

import numpy as np
import pytest

from vllama_jax.data import media, records
from vllama_jax.data.pipeline import ExampleBuilder, PipelineConfig
from vllama_jax.data.synthetic import write_test_video
from vllama_jax.testing import media_reference
from vllama_jax.train.feature_cache import reading_config

SIZE, FRAMES, CLIPS = 224, 8, 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("entry_points")
    clip = media_reference.write_feature_video(root / "vfr.mp4", "vfr", n=40)  # VFR + B-frames
    sound = write_test_video(root / "sound.mp4", num_frames=40, fps=8, size=(96, 64), tone_hz=700.0,
                             sample_rate=44100)  # an AAC track at 44.1 kHz: resampled
    picture = root / "picture.jpg"
    from PIL import Image

    Image.fromarray(media_reference.scene(1, 333, 500)[0]).save(picture)
    return {"video": clip, "sound": sound, "image": picture}


def pipeline_example(tokenizer, path, kind, with_audio=False, train=False, sampling="uniform"):
    data = path.read_bytes()
    sample = records.Sample("x", "test", kind, data, path.name, caption=b"a clip", **records.probe_media(data, kind))
    config = PipelineConfig(batch_size=1, image_size=SIZE, num_frames=FRAMES, num_soft_tokens=4, max_txt_len=8,
                            text_length=1 + 4 + 8, image_token_id=tokenizer.convert_tokens_to_ids("<ImageHere>"),
                            frame_sampling=sampling, train=train, with_audio=with_audio, clips_per_video=CLIPS)
    builder = ExampleBuilder(config, tokenizer)
    example = builder.random_map(records.encode(sample), np.random.default_rng(0))
    assert example["example_mask"], example["skip_reason"]
    cached = ExampleBuilder(reading_config(config), tokenizer)  # the feature cache's reading of the same record
    return example, cached.random_map(records.encode(sample), np.random.default_rng(1))


def data_imports(module: str) -> set[tuple[str, str]]:
    tree = ast.parse((Path(media.__file__).parents[1] / "infer" / f"{module}.py").read_text())
    return {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module.startswith("vllama_jax.data") for alias in node.names}


def calls_in(module: str, function: str) -> set[str]:
    tree = ast.parse((Path(media.__file__).parents[1] / "infer" / f"{module}.py").read_text())
    (body,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
    return {ast.unparse(n.func) for n in ast.walk(body) if isinstance(n, ast.Call)}


def test_chat_and_caption_read_media_through_data_media():
    # Video-LLaMA's media come through data.media; Video-LLaVA's through data.llava_video (its own transforms over
    # the same decoder, data.video); the tokenizer is not media
    media_imports = data_imports("chat") - {("vllama_jax.data.tokenizer", "load_tokenizer")}
    assert media_imports == {("vllama_jax.data.media", n) for n in ("audio_clips", "image_frames", "video_frames")} | {
        ("vllama_jax.data", "llava_video")}
    assert ("vllama_jax.data", "media") in data_imports("caption")
    assert "media.item_inputs" in calls_in("caption", "read_item")


def caption_item(source, with_audio=False, kind="video"):
    return media.item_inputs(kind, source, SIZE, FRAMES, CLIPS if with_audio else None,
                             name=None if isinstance(source, str) else "x")


def test_video_frames_are_identical_at_every_entry_point(files, tokenizer):
    path = files["video"]
    frames, seconds = media.video_frames(path, FRAMES, SIZE)
    from_folder = caption_item(str(path))
    from_shard = caption_item(path.read_bytes())
    example, cached = pipeline_example(tokenizer, path, "video", sampling="headtail")  # the cache reads uniform
    example, _ = pipeline_example(tokenizer, path, "video")
    for other in (from_folder["frames"], from_shard["frames"], example["frames"], cached["frames"]):
        assert np.abs(other - frames).max() == 0.0
    assert from_folder["seconds"] == from_shard["seconds"] == seconds
    reference, _, _ = media_reference.original_load_video(path, FRAMES, SIZE)  # and they are the original's
    assert np.abs(frames - reference).max() <= 1e-6


def test_images_are_identical_at_every_entry_point(files, tokenizer):
    path = files["image"]
    frames = media.image_frames(path, SIZE)
    from_shard = caption_item(path.read_bytes(), kind="image")["frames"]
    example, cached = pipeline_example(tokenizer, path, "image")
    assert frames.shape == (1, SIZE, SIZE, 3) and list(example["frame_mask"]) == [True] + [False] * (FRAMES - 1)
    for other in (from_shard[0], example["frames"][0], cached["frames"][0]):
        assert np.abs(other - frames[0]).max() == 0.0
    assert np.abs(frames[0] - media_reference.blip2_image_eval(path, SIZE)).max() <= 1e-3


def test_audio_clips_are_identical_at_every_entry_point(files, tokenizer):
    path = files["sound"]
    clips = media.audio_clips(path, CLIPS)
    from_folder = caption_item(str(path), with_audio=True)["audio"]
    from_shard = caption_item(path.read_bytes(), with_audio=True)["audio"]
    example, cached = pipeline_example(tokenizer, path, "video", with_audio=True)
    assert clips.shape == (CLIPS, 1, 128, 204) and example["audio_mask"]
    for other in (from_folder, from_shard, example["audio"], cached["audio"]):
        assert np.abs(other - clips).max() == 0.0


def test_the_clean_train_crop_reads_native_frames(files, tokenizer):
    """PipelineConfig.crop_native (docs/data.md): the train crop of native-size frames, a usable example."""
    path = files["video"]
    data = path.read_bytes()
    sample = records.Sample("x", "test", "video", data, path.name, caption=b"a clip",
                            **records.probe_media(data, "video"))
    config = PipelineConfig(batch_size=1, image_size=64, num_frames=4, num_soft_tokens=4, max_txt_len=8,
                            text_length=1 + 4 + 8, image_token_id=tokenizer.convert_tokens_to_ids("<ImageHere>"),
                            crop_native=True)
    example = ExampleBuilder(config, tokenizer).random_map(records.encode(sample), np.random.default_rng(0))
    assert example["example_mask"] and example["frames"].shape == (4, 64, 64, 3)

