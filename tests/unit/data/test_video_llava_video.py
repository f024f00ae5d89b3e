"""Video-LLaVA's video preprocessing (`data/llava_video.py`) on a real mp4 against the original's steps written in
PyTorch (/255, CLIP normalise, pytorchvideo's ShortSideScale = F.interpolate bilinear, CenterCropVideo), <= 1e-5."""
import math

import numpy as np
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
