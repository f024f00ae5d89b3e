"""Images for the model, as the original's BLIP-2 processors make them: Pillow decodes and resizes.

`Blip2ImageEvalProcessor` is torchvision's `Resize((S, S), BICUBIC)` on a PIL image, which is Pillow's own
`resize` (bicubic with antialiasing: its kernel widens with the downscale factor), then `ToTensor` (/255) and the
CLIP normalisation. `Blip2ImageTrainProcessor` is `RandomResizedCrop(S, scale=(0.5, 1), BICUBIC)`: Pillow crops,
then resizes the same way. Decoding with Pillow matters too: its JPEG decoder upsamples chroma differently from
FFmpeg's. EXIF orientation is not applied, as in the original.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from vllama_jax.data import video


def _label(source, name: str | None) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<bytes> {name}" if name else "<bytes>"
    return str(source)


def read_image(source: str | Path | bytes, name: str | None = None):
    """A path or encoded bytes -> an RGB PIL image (what `Image.open(path).convert('RGB')` gives the original)."""
    from PIL import Image

    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with Image.open(stream) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{_label(source, name)}: not a readable image ({err})") from err


def to_model(img, image_size: int) -> np.ndarray:
    """An RGB PIL image resized to image_size² by Pillow's bicubic (antialiased) -> (S, S, 3) float32 normalised."""
    from PIL import Image

    resized = img.resize((image_size, image_size), Image.BICUBIC)
    return video.normalize(np.asarray(resized))


def eval_image(source: str | Path | bytes, image_size: int, name: str | None = None) -> np.ndarray:
    """`Blip2ImageEvalProcessor`: (S, S, 3) float32."""
    return to_model(read_image(source, name), image_size)


def train_image(
    source: str | Path | bytes,
    rng: np.random.Generator,
    image_size: int,
    scale: tuple[float, float] = video.TRAIN_CROP_SCALE,
    name: str | None = None,
) -> np.ndarray:
    """`Blip2ImageTrainProcessor`: a RandomResizedCrop box (torchvision's rule, `video.random_resized_crop_params`)
    cut out of the decoded image, then Pillow's bicubic to S² -> (S, S, 3) float32."""
    img = read_image(source, name)
    top, left, h, w = video.random_resized_crop_params(img.height, img.width, rng, scale=scale)
    return to_model(img.crop((left, top, left + w, top + h)), image_size)
