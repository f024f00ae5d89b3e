"""Video-LLaVA's video preprocessing (`data/llava_video.py`) on a real mp4 against the original's steps written in
PyTorch (/255, CLIP normalise, pytorchvideo's ShortSideScale = F.interpolate bilinear, CenterCropVideo), <= 1e-5."""
import math

import numpy as np
import pytest
import torch

from vllama_jax.data import llava_video
from vllama_jax.data.synthetic import write_test_video
from vllama_jax.data.video import CLIP_MEAN, CLIP_STD, read_frames_seeking


def reference(frames_uint8: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(frames_uint8).permute(3, 0, 1, 2).float() / 255.0  # (C, T, H, W), as decord + permute
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None, None]) / torch.tensor(CLIP_STD)[:, None, None, None]
    c, t, h, w = x.shape
    new_h, new_w = (int(math.floor(h / w * size)), size) if w < h else (size, int(math.floor(w / h * size)))
    x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return x[:, :, top:top + size, left:left + size].permute(1, 2, 3, 0).numpy()


def test_frames_match_the_original_transform(tmp_path):
    path = write_test_video(tmp_path / "clip.mp4", num_frames=20, size=(64, 48), tone_hz=None)
    np.testing.assert_array_equal(llava_video.frame_indices(20), [0, 2, 5, 8, 10, 13, 16, 19])
    ours = llava_video.load_video(path)
    frames, _ = read_frames_seeking(path, llava_video.frame_indices(20), None)
    theirs = reference(frames, 224)
    assert ours.shape == (8, 224, 224, 3)
    error = float(np.abs(ours - theirs).max())
    print(f"max |frames - reference| = {error:.2e}")
    assert error <= 1e-5
    # the original's random flip, only when asked for
    rng = np.random.default_rng(3)
    flips = np.random.default_rng(3).random() < 0.5
    flipped = llava_video.transform(frames, flip_rng=rng)
    np.testing.assert_array_equal(flipped, ours[:, :, ::-1] if flips else ours)


def image_reference(path, size: int, pad: bool) -> np.ndarray:
    """LanguageBind's image transform in PyTorch: (expand2square) → ToTensor → Resize(size, bicubic) on the tensor
    (no antialiasing) → CenterCrop → Normalize."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    if pad:
        image = llava_video.expand_to_square(image, (122, 116, 104))
    x = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)[None]
    h, w = x.shape[2:]
    short, long = (w, h) if w <= h else (h, w)
    new = (int(size * long / short), size) if w <= h else (size, int(size * long / short))
    x = torch.nn.functional.interpolate(x, size=new, mode="bicubic", align_corners=False)[0]
    top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    x = x[:, top:top + size, left:left + size]
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    return x.permute(1, 2, 0).numpy()


def test_images_match_the_original_transform(tmp_path):
    from vllama_jax.data.synthetic import write_test_image

    path = write_test_image(tmp_path / "image.jpg", size=(40, 30))
    for pad in (False, True):
        ours = llava_video.load_image(path, pad=pad)
        error = float(np.abs(ours - image_reference(path, 224, pad)).max())
        print(f"max |image - reference| (pad={pad}) = {error:.2e}")
        assert ours.shape == (224, 224, 3) and error <= 1e-5
    assert llava_video.PAD_COLOUR == (122, 116, 104)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg: cannot read image"):
        llava_video.load_image(tmp_path / "bad.jpg")
