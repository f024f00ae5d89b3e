"""Audio for the audio branch: ImageBind's `load_and_transform_audio_data` rebuilt on numpy and PyAV.

waveform (integer PCM / 2^(bits − 1), as torchaudio.load) → 16 kHz by torchaudio's windowed-sinc resampler
(`resample`) → `clips_per_video` 2-second clips → Kaldi-compatible log-mel fbank (128 bins, 25 ms / 10 ms,
hanning window, dither 0, DC offset removed per frame, pre-emphasis 0.97) → (128, frames) padded or cut to 204
frames → (x − mean) / std with ImageBind's AudioSet statistics.

By default three quirks of the original are reproduced, since they change the numbers a trained model saw:
clip starts are spaced (duration − 2) / N apart (not N − 1); clips are views of one waveform and the per-clip
mean is subtracted in place, so an overlapping later clip sees already-shifted samples; that mean is over all
channels while the fbank reads channel 0. `faithful=False` gives the clean variant (mono downmix, copies).
"""
from __future__ import annotations

import io
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
TARGET_FRAMES = 204  # fbank frames per clip after padding (a 2-s clip gives 198)
CLIP_SECONDS = 2
AUDIO_MEAN = -4.268
AUDIO_STD = 9.138
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # Kaldi's floor before the log


def mel_scale(freq):
    return 1127.0 * np.log(1.0 + np.asarray(freq, np.float64) / 700.0)


def mel_banks(num_bins: int, fft_size: int, sample_rate: float, low_freq: float = 20.0, high_freq: float = 0.0):
    """Kaldi's triangular mel filters, (num_bins, fft_size // 2 + 1); the Nyquist column is zero as in Kaldi."""
    nyquist = 0.5 * sample_rate
    high_freq = high_freq + nyquist if high_freq <= 0 else high_freq
    mel_low, mel_high = mel_scale(low_freq), mel_scale(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    index = np.arange(num_bins, dtype=np.float64)[:, None]
    left, center, right = mel_low + index * delta, mel_low + (index + 1) * delta, mel_low + (index + 2) * delta
    mel = mel_scale(sample_rate / fft_size * np.arange(fft_size // 2))[None, :]
    weights = np.maximum(0.0, np.minimum((mel - left) / (center - left), (right - mel) / (right - center)))
    return np.pad(weights, ((0, 0), (0, 1)))


def kaldi_fbank(
    wave: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    num_mel_bins: int = NUM_MEL_BINS,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    preemphasis: float = 0.97,
) -> np.ndarray:
    """Log-mel filterbank of a 1-D waveform, (frames, num_mel_bins) float32, as Kaldi's compute-fbank-feats with
    ImageBind's options (htk_compat, use_energy off, hanning window, dither 0, snip_edges, power spectrum).

    Computed in float64. torchaudio computes in float32, which in mel bins at the float32 noise floor (a pure
    digital tone, nothing else) moves its own log energies by up to 3e-3 against its float64 run; on audio with
    any noise floor the two agree to < 1e-3 (tests/unit/data/test_audio.py measures both).
    """
    wave = np.asarray(wave, np.float64)
    window = int(sample_rate * frame_length_ms / 1000)
    shift = int(sample_rate * frame_shift_ms / 1000)
    if len(wave) < window:
        raise ValueError(f"waveform of {len(wave)} samples is shorter than one {window}-sample frame")
    fft_size = 1 << (window - 1).bit_length()
    num_frames = 1 + (len(wave) - window) // shift
    frames = np.lib.stride_tricks.sliding_window_view(wave, window)[::shift][:num_frames]
    frames = frames - frames.mean(axis=1, keepdims=True)
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)  # the first sample repeats itself
    frames = frames - preemphasis * previous
    frames = frames * np.hanning(window)  # symmetric Hann, Kaldi's "hanning"
    power = np.abs(np.fft.rfft(frames, n=fft_size)) ** 2
    energies = power @ mel_banks(num_mel_bins, fft_size, sample_rate).T
    return np.log(np.maximum(energies, FLOAT32_EPS)).astype(np.float32)


def clip_spans(
    duration: float, clips_per_video: int, clip_seconds: float = CLIP_SECONDS
) -> list[tuple[Fraction, Fraction]]:
    """pytorchvideo's ConstantClipsPerVideoSampler: start_i = i · max(duration − clip, 0) / N, exact fractions."""
    step = Fraction(max(Fraction(duration) - Fraction(clip_seconds), 0)) / clips_per_video
    return [(step * i, step * i + Fraction(clip_seconds)) for i in range(clips_per_video)]


def fbank_clips(
    waveform: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    clips_per_video: int = 8,
    faithful: bool = True,
) -> np.ndarray:
    """(channels, samples) at `sample_rate` -> normalised fbank clips (clips_per_video, 1, 128, 204) float32."""
    waveform = np.array(waveform, np.float32, ndmin=2)  # a private copy: the faithful path edits it in place
    if not faithful:
        waveform = waveform.mean(axis=0, keepdims=True)
    spans = clip_spans(waveform.shape[1] / sample_rate, clips_per_video)
    out = np.zeros((clips_per_video, 1, NUM_MEL_BINS, TARGET_FRAMES), np.float32)
    for i, (start, end) in enumerate(spans):
        clip = waveform[:, int(start * sample_rate) : int(end * sample_rate)]
        if faithful:
            clip -= clip.mean()  # a view: later overlapping clips see these shifted samples, as in the original
        else:
            clip = clip - clip.mean()
        feats = kaldi_fbank(clip[0], sample_rate).T[:, :TARGET_FRAMES]
        out[i, 0, :, : feats.shape[1]] = feats
    return (out - AUDIO_MEAN) / AUDIO_STD


def resample_kernel(orig_freq: int, new_freq: int, lowpass_filter_width: int = 6, rolloff: float = 0.99):
    """torchaudio's `sinc_interp_hann` filter bank: (new, 2·width + orig) taps for the frequencies reduced by their
    gcd, and `width`. A sinc low-passed at rolloff × the lower Nyquist rate, under a Hann window (cos² over
    ±lowpass_filter_width zero crossings), one row per output phase.

    Computed in float32 in torchaudio's order of operations, as it does for a float32 waveform: the taps' float32
    rounding alone moves the resampled waveform by ~6e-6, which the top mel bins (7.5–8 kHz, just under the
    filter's cutoff, where little energy is left) turn into log-mel differences of up to 0.04."""
    f32 = np.float32
    orig, new = int(orig_freq), int(new_freq)
    cutoff = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / cutoff)
    taps = np.arange(-width, width + orig, dtype=f32)[None, :] / f32(orig)
    t = (np.arange(0, -new, -1, dtype=f32)[:, None] / f32(new) + taps) * f32(cutoff)
    t = np.clip(t, f32(-lowpass_filter_width), f32(lowpass_filter_width))
    window = np.cos(t * f32(math.pi) / f32(lowpass_filter_width) / f32(2)) ** 2
    t = t * f32(math.pi)
    with np.errstate(invalid="ignore", divide="ignore"):
        sinc = np.where(t == 0, f32(1), np.sin(t) / t)
    return (sinc * (window * f32(cutoff / orig))).astype(f32), width


def resample(waveform: np.ndarray, orig_freq: int, new_freq: int, lowpass_filter_width: int = 6,
             rolloff: float = 0.99) -> np.ndarray:
    """(..., samples) at orig_freq -> (..., ceil(samples · new / orig)) at new_freq as
    `torchaudio.functional.resample` (its default `sinc_interp_hann`, width 6, rolloff 0.99), which ImageBind
    calls: zero-padded by the filter width, each output phase a strided correlation with its row of the kernel.
    float32 out."""
    waveform = np.asarray(waveform, np.float32)
    if orig_freq == new_freq:
        return waveform
    gcd = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // gcd, int(new_freq) // gcd
    kernel, width = resample_kernel(orig, new, lowpass_filter_width, rolloff)
    flat = waveform.reshape(-1, waveform.shape[-1]).astype(np.float64)
    length = flat.shape[1]
    taps = kernel.shape[1]
    blocks = (length + 2 * width + orig - taps) // orig + 1  # conv1d's output length at stride orig
    groups = -(-taps // orig)  # the kernel cut into groups of orig taps: no strided copy of the signal needed
    kernel = np.pad(kernel, ((0, 0), (0, groups * orig - taps)))
    padded = np.pad(flat, ((0, 0), (width, width + orig + (blocks + groups - 1) * orig - (length + 2 * width + orig))))
    rows = padded[:, : (blocks + groups - 1) * orig].reshape(flat.shape[0], blocks + groups - 1, orig)
    out = sum(rows[:, j : j + blocks] @ kernel[:, j * orig : (j + 1) * orig].T for j in range(groups))
    out = out.reshape(flat.shape[0], -1)[:, : math.ceil(new * length / orig)]
    return out.reshape(*waveform.shape[:-1], -1).astype(np.float32)


def pcm_to_float(data: np.ndarray) -> np.ndarray:
    """Decoded samples -> float32 as torchaudio.load normalises them: signed integers / 2^(bits − 1) (int16 / 32768,
    so −32768 is exactly −1), unsigned 8-bit (x − 128) / 128; float formats unchanged."""
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(data.dtype, np.integer):
        return (data.astype(np.float64) / float(2 ** (8 * data.dtype.itemsize - 1))).astype(np.float32)
    return data.astype(np.float32)


def read_audio(path: str | Path | bytes, sample_rate: int = SAMPLE_RATE, name: str = "<bytes>") -> np.ndarray | None:
    """The first audio track of a media file (a path, or its encoded bytes) as float32 (channels, samples)
    resampled to `sample_rate` as torchaudio does (`resample`); None when the file has no audio track."""
    source = io.BytesIO(path) if isinstance(path, bytes) else str(path)
    path = name if isinstance(path, bytes) else path
    try:
        with av.open(source) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            chunks = [frame.to_ndarray() for frame in container.decode(stream)]
            rate, planar = stream.codec_context.sample_rate, stream.codec_context.format.is_planar
            channels = stream.codec_context.channels
    except av.error.FFmpegError as err:
        raise ValueError(f"{path}: cannot decode audio ({err})") from err
    if not chunks:
        return None
    # planar formats decode as (channels, n); packed ones as (1, n * channels)
    data = np.concatenate(chunks, axis=1)
    if not planar:
        data = data.reshape(-1, channels).T
    return resample(pcm_to_float(data), rate, sample_rate)


def load_audio_clips(
    path: str | Path | bytes, clips_per_video: int = 8, faithful: bool = True, name: str = "<bytes>"
) -> tuple[np.ndarray, bool]:
    """Fbank clips of a file's audio track and whether it had one; a silent video gives zeros and False."""
    waveform = read_audio(path, name=name)
    if waveform is None or waveform.shape[1] < int(0.025 * SAMPLE_RATE):
        return np.zeros((clips_per_video, 1, NUM_MEL_BINS, TARGET_FRAMES), np.float32), False
    return fbank_clips(waveform, SAMPLE_RATE, clips_per_video, faithful), True
