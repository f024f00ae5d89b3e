"""torchaudio's Kaldi fbank as the reference, without a torchaudio build for our torch.

`compliance/kaldi.py` is read out of the torchaudio 2.11.0 wheel (fetched once with `pip download`) and loaded
with a stand-in `torchaudio` package in sys.modules; `fbank` itself needs only torch. ImageBind's audio
transform is restated below on top of it, quirks included, as the original code runs it.
"""
import importlib.util
import subprocess
import sys
import types
import zipfile
from fractions import Fraction
from pathlib import Path

import torch

WHEEL = "torchaudio==2.11.0"
CACHE = Path.home() / ".cache" / "vllama-jax-tests" / "torchaudio-2.11.0"


def load_kaldi():
    source = CACHE / "kaldi.py"
    if not source.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(CACHE)], check=True
        )
        (wheel,) = CACHE.glob("torchaudio-2.11.0-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            source.write_bytes(zf.read("torchaudio/compliance/kaldi.py"))
    if "torchaudio" not in sys.modules:
        stand_in = types.ModuleType("torchaudio")
        stand_in.__path__ = []
        sys.modules["torchaudio"] = stand_in
    spec = importlib.util.spec_from_file_location("reference_kaldi", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def imagebind_audio(kaldi, waveform: torch.Tensor, sample_rate=16000, clips_per_video=8):
    """ImageBind's load_and_transform_audio_data after loading: clip views, in-place mean, fbank, pad, normalise."""
    duration = waveform.size(1) / sample_rate
    step = Fraction(max(Fraction(duration) - 2, 0)) / clips_per_video
    clips = []
    for i in range(clips_per_video):
        start, end = step * i, step * i + 2
        clip = waveform[:, int(start * sample_rate):int(end * sample_rate)]
        clip -= clip.mean()
        fbank = kaldi.fbank(
            clip, htk_compat=True, sample_frequency=sample_rate, use_energy=False, window_type="hanning",
            num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10,
        ).transpose(0, 1)
        pad = 204 - fbank.size(1)
        fbank = torch.nn.functional.pad(fbank, (0, pad)) if pad > 0 else fbank[:, :204]
        clips.append(((fbank - (-4.268)) / 9.138).unsqueeze(0))
    return torch.stack(clips)
