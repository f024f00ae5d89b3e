"""Kaldi-compatible fbank, torchaudio's resampler and ImageBind's audio transform against torchaudio's code (<= 1e-3
max abs on fbank values, <= 1e-4 on resampled waveforms)."""
import wave

import numpy as np
import pytest
import torch

from vllama_jax.data import audio
from vllama_jax.data.synthetic import write_test_video
from vllama_jax.testing import kaldi_reference, media_reference

TOL = 1e-3


@pytest.fixture(scope="module")
def kaldi():
    return kaldi_reference.load_kaldi()


def speech_like(seconds=5.0, sr=16000, seed=0):
    """A voiced source (pitch gliding 100-180 Hz) through three moving formant resonators, syllable-rate
    amplitude envelope, and fricative noise bursts: the spectral shape of speech without a recording."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    pitch = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    source = sum(np.sin(k * phase) / k for k in range(1, 30))
    out = np.zeros_like(t)
    for f0, sweep in ((700, 200), (1200, 500), (2600, 300)):
        formant = f0 + sweep * np.sin(2 * np.pi * 1.3 * t + f0)
        out += np.sin(2 * np.pi * np.cumsum(formant) / sr) * source / 3
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    bursts = (np.sin(2 * np.pi * 1.1 * t) > 0.8) * rng.standard_normal(len(t)) * 0.3
    return (0.2 * out * envelope + bursts + 0.01).astype(np.float32)  # + a DC offset


def tonal(seconds=3.3, sr=16000, noise_floor=1e-3, seed=1):
    """A chirp over a major chord, with the faint noise floor (-50 dB) any recording has unless noise_floor=0."""
    t = np.arange(int(seconds * sr)) / sr
    chirp = np.sin(2 * np.pi * (200 * t + 600 * t**2))
    chord = sum(np.sin(2 * np.pi * f * t) for f in (261.6, 329.6, 392.0))
    noise = noise_floor * np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * chirp + 0.2 * chord + noise).astype(np.float32)


def reference_fbank(kaldi, signal, dtype=torch.float32):
    return kaldi.fbank(
        torch.from_numpy(signal).to(dtype)[None], htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10,
    ).numpy()


@pytest.mark.parametrize("signal", [speech_like(2.0), tonal(2.0)], ids=["speech", "tonal"])
def test_fbank_matches_torchaudio(kaldi, signal):
    ours = audio.kaldi_fbank(signal)
    theirs = reference_fbank(kaldi, signal)
    assert ours.shape == theirs.shape == (198, 128)
    err = float(np.abs(ours - theirs).max())
    print(f"[parity] kaldi fbank: max abs diff {err:.2e}")
    assert err <= TOL


def test_fbank_of_a_pure_digital_tone(kaldi):
    """No noise floor at all: quiet bins sit at float32's rounding floor, where torchaudio's float32 run is
    itself 3e-3 away from its float64 run. We match the float64 run to 1e-3 and float32 to its own spread."""
    signal = tonal(2.0, noise_floor=0.0)
    ours = audio.kaldi_fbank(signal)
    exact = reference_fbank(kaldi, signal, torch.float64)
    rounded = reference_fbank(kaldi, signal, torch.float32)
    spread = float(np.abs(rounded - exact).max())
    print(f"[parity] pure tone: vs torchaudio fp64 {np.abs(ours - exact).max():.2e}, vs fp32 "
          f"{np.abs(ours - rounded).max():.2e} (fp32 vs fp64 itself {spread:.2e})")
    assert float(np.abs(ours - exact).max()) <= TOL
    assert float(np.abs(ours - rounded).max()) <= spread + TOL


@pytest.mark.parametrize(
    "make,channels", [(speech_like, 1), (tonal, 1), (speech_like, 2)], ids=["speech", "tonal", "speech-stereo"]
)
def test_imagebind_clips_match_original_quirks_included(kaldi, make, channels):
    wave = make()
    if channels == 2:
        wave = np.stack([wave, 0.5 * wave[::-1] + 0.05])  # a different second channel with its own offset
    wave = np.array(wave, np.float32, ndmin=2)
    ours = audio.fbank_clips(wave, clips_per_video=8)
    theirs = kaldi_reference.imagebind_audio(kaldi, torch.from_numpy(wave.copy()), clips_per_video=8).numpy()
    assert ours.shape == theirs.shape == (8, 1, 128, 204)
    err = float(np.abs(ours - theirs).max())
    print(f"[parity] ImageBind audio clips ({channels} ch): max abs diff {err:.2e}")
    assert err <= TOL
    # the quirks matter: the clean variant moves the numbers by more than the tolerance
    clean = audio.fbank_clips(wave, clips_per_video=8, faithful=False)
    assert float(np.abs(clean - theirs).max()) > TOL


def test_clip_spans_divide_by_n():
    spans = audio.clip_spans(10.0, 8)
    assert [float(s) for s, _ in spans] == [i * 1.0 for i in range(8)]  # (10 - 2) / 8 apart, last starts at 7
    assert all(float(e - s) == 2.0 for s, e in spans)
    assert [float(s) for s, _ in audio.clip_spans(1.5, 3)] == [0.0, 0.0, 0.0]  # shorter than a clip


def test_audio_track_of_a_real_mp4(tmp_path, kaldi):
    path = write_test_video(tmp_path / "tone.mp4", num_frames=40, fps=8, tone_hz=1000.0)
    wave = audio.read_audio(path)
    assert wave.shape[0] == 1 and abs(wave.shape[1] / 16000 - 5.0) < 0.1
    # the 1 kHz tone dominates the spectrum
    spectrum = np.abs(np.fft.rfft(wave[0, 8000:24000]))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 1000) < 5
    clips, has_audio = audio.load_audio_clips(path)
    assert has_audio and clips.shape == (8, 1, 128, 204)
    theirs = kaldi_reference.imagebind_audio(kaldi, torch.from_numpy(wave.copy())).numpy()
    assert float(np.abs(clips - theirs).max()) <= TOL


def test_video_without_audio_gives_zeros_and_a_mask(tmp_path):
    path = write_test_video(tmp_path / "silent.mp4", num_frames=16, tone_hz=None)
    clips, has_audio = audio.load_audio_clips(path, clips_per_video=4)
    assert not has_audio and clips.shape == (4, 1, 128, 204) and not clips.any()


def test_unreadable_audio_names_the_file(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....not audio")
    with pytest.raises(ValueError, match="broken.wav"):
        audio.read_audio(bad)


@pytest.mark.parametrize("pitch,rhythm", [("low", "steady"), ("high", "beeping")])
def test_sound_world_clips_carry_the_tone_their_caption_names(tmp_path, pitch, rhythm):
    """The audio-visual tiny world: the mp4's AAC track has the caption's pitch (spectral peak) and rhythm
    (silent gaps when beeping), and the caption parses back to both."""
    from vllama_jax.data.synthetic import PITCHES, parse_caption, shape_caption, write_shape_video

    path = write_shape_video(tmp_path / "clip.mp4", "red", "circle", "from left to right", np.random.default_rng(0),
                             sound=(pitch, rhythm))
    wave = audio.read_audio(path)[0]
    assert abs(len(wave) / 16000 - 2.25) < 0.1
    peak = np.argmax(np.abs(np.fft.rfft(wave))) * 16000 / len(wave)
    assert abs(peak - PITCHES[pitch]) <= 0.06 * PITCHES[pitch], peak
    windows = np.abs(wave[: len(wave) // 400 * 400]).reshape(-1, 400).max(axis=1)  # 25-ms windows
    silent = float(np.mean(windows < 0.02))
    assert (0.3 < silent < 0.7) if rhythm == "beeping" else silent < 0.1, silent
    assert parse_caption(shape_caption("red", "circle", "from left to right", (pitch, rhythm))) == {
        "color": "red", "shape": "circle", "motion": "from left to right", "pitch": pitch, "rhythm": rhythm}


RATES = [44100, 48000, 22050, 8000]


@pytest.mark.parametrize("rate", RATES)
def test_resample_matches_torchaudio(rate):
    """torchaudio.functional.resample (sinc_interp_hann, width 6, rolloff 0.99), restated in torch in
    testing/media_reference.py: <= 1e-4 on the waveform (measured <= 3e-7)."""
    stereo = np.stack([speech_like(2.3, rate), tonal(2.3, rate)])
    ours = audio.resample(stereo, rate, 16000)
    theirs = media_reference.torchaudio_resample(stereo, rate, 16000)
    assert ours.shape == theirs.shape == (2, int(np.ceil(stereo.shape[1] * 16000 / rate)))
    err = float(np.abs(ours - theirs).max())
    print(f"[parity] resample {rate} -> 16000: max abs diff {err:.2e}")
    assert err <= 1e-4


def write_wav(path, samples_int16, rate):
    """A PCM16 WAV by the standard library (interleaved channels)."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(samples_int16.shape[0])
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.ascontiguousarray(samples_int16.T).tobytes())
    return path


@pytest.mark.parametrize("rate", RATES)
def test_a_wav_file_through_the_whole_transform_matches_imagebind(tmp_path, kaldi, rate):
    """ImageBind's load_and_transform_audio_data on a PCM16 WAV: torchaudio.load (int16 / 32768) -> resample ->
    clips -> fbank; every mel bin <= 1e-3."""
    stereo = np.stack([speech_like(4.0, rate, seed=2), tonal(4.0, rate)])
    pcm = np.clip(np.round(stereo * 32768), -32768, 32767).astype(np.int16)
    path = write_wav(tmp_path / f"sound_{rate}.wav", pcm, rate)
    with wave.open(str(path)) as source:  # an independent decoder: the standard library's
        decoded = np.frombuffer(source.readframes(source.getnframes()), np.int16).reshape(-1, 2).T
    waveform = media_reference.torchaudio_resample(decoded.astype(np.float32) / 32768.0, rate, 16000)
    theirs = kaldi_reference.imagebind_audio(kaldi, torch.from_numpy(waveform.copy())).numpy()
    clips, has_audio = audio.load_audio_clips(path)
    assert has_audio and clips.shape == theirs.shape == (8, 1, 128, 204)
    per_bin = np.abs(clips - theirs).max(axis=(0, 1, 3))
    print(f"[parity] wav {rate} Hz through the transform: max abs diff {per_bin.max():.2e} "
          f"(mel bins 125-127: {per_bin[125:].max():.2e})")
    assert per_bin.max() <= 1e-3


def test_pcm_is_scaled_as_torchaudio_loads_it():
    assert audio.pcm_to_float(np.array([[-32768, 0, 16384, 32767]], np.int16)).tolist() == [
        [-1.0, 0.0, 0.5, 32767 / 32768]]
    assert audio.pcm_to_float(np.array([[-2**31, 2**30]], np.int32)).tolist() == [[-1.0, 0.5]]
    assert audio.pcm_to_float(np.array([[0, 128, 192]], np.uint8)).tolist() == [[-1.0, 0.0, 0.5]]
