"""The Video-LLaVA key mapping (`convert/video_llava.py`) and `vllama-convert` on real files written here: the
original release's layout as `.bin` shards with their index (temporal layers included), transformers' layout as
its own `save_pretrained` folder. Round trips are bit-exact; refusals name the problem and write nothing."""
import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from vllama_jax.checkpoints import read_saved
from vllama_jax.config import load_config, model_config
from vllama_jax.convert import video_llava as convert
from vllama_jax.convert.main import main
from vllama_jax.convert.mapping import ConversionError
from vllama_jax.testing import video_llava_reference as reference

CONFIG = "configs/video_llava.py:llm=tiny"


@pytest.fixture(scope="module")
def release(repo_root, tmp_path_factory):
    """(config, spatial config, transformers model, original state dict, original folder, transformers folder)."""
    config = model_config(load_config(str(repo_root / CONFIG)))
    spatial = dataclasses.replace(config, video_tower=dataclasses.replace(config.video_tower, temporal_attention=False))
    hf = reference.hf_model(config.image_tower, config.llm, config.image_token_id, config.video_token_id)
    original = reference.original_state_dict(hf, reference.temporal_tower(config.video_tower))
    root = tmp_path_factory.mktemp("video_llava")
    folder = root / "Video-LLaVA-7B"
    folder.mkdir()
    keys = sorted(original)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        torch.save({k: torch.from_numpy(original[k]) for k in shard_keys}, folder / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    hf.save_pretrained(root / "Video-LLaVA-7B-hf")
    return config, spatial, hf, original, folder, root / "Video-LLaVA-7B-hf"


def run(repo_root, *args):
    """`vllama-convert` in this process: (exit status, stdout, stderr)."""
    import contextlib
    import io
    import os

    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(repo_root)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([*map(str, args)])
    finally:
        os.chdir(cwd)
    return code, out.getvalue(), err.getvalue()


def test_the_original_release_round_trips_bit_for_bit(repo_root, release, tmp_path):
    _, _, _, original, folder, _ = release
    code, stdout, stderr = run(repo_root, "import", f"--config={CONFIG}", f"--source={folder}",
                               f"--out={tmp_path / 'ckpt'}")
    assert code == 0, stderr
    assert f"original layout: {len(original)} tensors" in stdout
    code, stdout, stderr = run(repo_root, "export", f"--config={CONFIG}", f"--params={tmp_path / 'ckpt'}",
                               "--format=video_llava", f"--out={tmp_path / 'back'}")
    assert code == 0, stderr
    back = dict(convert.read_state_dict(tmp_path / "back"))
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
    assert any(".temporal_attn.q_proj.weight" in k for k in back)


def test_the_transformers_folder_round_trips_and_loads_back(repo_root, release, tmp_path):
    from transformers import VideoLlavaForConditionalGeneration

    _, spatial, hf, _, _, hf_folder = release
    params, layout = convert.import_params(convert.read_state_dict(hf_folder), spatial,
                                           convert.abstract_params(spatial))
    assert layout == "hf"
    convert.run_export(spatial, params, out=tmp_path / "hf", layout="hf", log=lambda *_: None)
    loaded = VideoLlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    for key, value in hf.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_transformers_export_drops_temporal_attention_only_when_told(repo_root, release, tmp_path):
    config, *_, folder, _ = release
    tower = config.video_tower
    per_layer = 4 * (tower.width**2 + tower.width) + 2 * tower.width + tower.num_frames * tower.width
    code, _, stderr = run(repo_root, "import", f"--config={CONFIG}", f"--source={folder}", f"--out={tmp_path / 'ckpt'}")
    assert code == 0, stderr
    export = ("export", f"--config={CONFIG}", f"--params={tmp_path / 'ckpt'}", "--format=video_llava_hf",
              f"--out={tmp_path / 'hf'}")
    code, _, stderr = run(repo_root, *export)
    assert code == 2 and "--drop_temporal_attention" in stderr and f"{tower.num_layers * per_layer:,}" in stderr
    assert not list(tmp_path.glob("hf*"))
    code, stdout, stderr = run(repo_root, *export, "--drop_temporal_attention")
    assert code == 0, stderr
    assert f"dropped the video tower's temporal attention: {tower.num_layers * per_layer:,} parameters" in stdout
    saved = convert.read_state_dict(tmp_path / "hf")
    assert not [k for k in saved if "temporal" in k] and "video_tower.pre_layrnorm.weight" in saved


def test_refusals_name_the_problem_and_write_nothing(repo_root, release, tmp_path):
    config, spatial, _, original, folder, hf_folder = release
    abstract = convert.abstract_params(config)
    unknown = dict(original, **{"model.mm_projector.4.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ConversionError, match=re.escape("unexpected keys: model.mm_projector.4.weight")):
        convert.import_params(unknown, config, abstract)
    wrong = dict(original)
    key = "model.mm_projector.0.weight"
    wrong[key] = original[key].T.copy()
    with pytest.raises(ConversionError, match=re.escape(f"{key}: shape {wrong[key].shape}, expected")):
        convert.import_params(wrong, config, abstract)
    # transformers' folder has no temporal layers: a temporal config finds them missing
    code, _, stderr = run(repo_root, "import", f"--config={CONFIG}", f"--source={hf_folder}",
                          f"--out={tmp_path / 'ckpt'}")
    assert code == 2 and "missing key 'video_tower.encoder.layers.0.temporal_embedding'" in stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in unknown.items()}, bad / "pytorch_model.bin")
    code, _, stderr = run(repo_root, "import", f"--config={CONFIG}", f"--source={bad}", f"--out={tmp_path / 'ckpt'}")
    assert code == 2 and "model.mm_projector.4.weight" in stderr
    assert not (tmp_path / "ckpt").exists()


def test_scanned_layers_convert_like_unrolled_ones(release):
    config, *_ = release
    scanned = dataclasses.replace(
        config,
        image_tower=dataclasses.replace(config.image_tower, scan_layers=True),
        video_tower=dataclasses.replace(config.video_tower, scan_layers=True),
        llm=dataclasses.replace(config.llm, scan_layers=True),
    )
    original = release[3]
    params, _ = convert.import_params(original, scanned, convert.abstract_params(scanned))
    assert params["video_tower"]["layers"]["temporal_embedding"].shape == (2, 1, 4, 32)  # 2 used layers stacked
    state, dropped = convert.export_params(params, scanned)
    assert dropped == 0 and sorted(state) == sorted(original)
    for key, value in original.items():
        assert np.array_equal(state[key], value), key


def test_read_saved_gives_the_imported_arrays(repo_root, release, tmp_path):
    _, _, _, original, folder, _ = release
    code, _, stderr = run(repo_root, "import", f"--config={CONFIG}", f"--source={folder}", f"--out={tmp_path / 'c'}")
    assert code == 0, stderr
    params, _ = read_saved(tmp_path / "c")
    kernel = np.asarray(params["mm_projector"]["linear_1"]["kernel"])
    np.testing.assert_array_equal(kernel, original["model.mm_projector.0.weight"].T)


def test_a_transformers_export_needs_a_vocabulary_holding_the_placeholders(release, tmp_path):
    config, spatial, *_ = release
    small = dataclasses.replace(spatial, llm=dataclasses.replace(spatial.llm, vocab_size=510))
    with pytest.raises(ConversionError, match=r"ids \(510, 511\) in the embedding table of 510 rows"):
        convert.run_export(small, {}, out=tmp_path / "hf", layout="hf")
    assert not list(tmp_path.iterdir())
