"""Audio loading and the log-Mel front end."""

from __future__ import annotations

import re

import librosa
import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from mlx_baldwhisper.audio import (
    N_FRAMES, N_SAMPLES, SAMPLE_RATE, AudioError, load_audio, log_mel_spectrogram, mel_filters,
    pad_or_trim,
)
from conftest import SHARED, needs_shared



def tone(sr: int, seconds: float, channels: int) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    chans = [0.5 * np.sin(2 * np.pi * 440 * t) * (c + 1) / channels for c in range(channels)]
    return np.stack(chans, axis=1).astype(np.float32)


def reference_log_mel(audio: np.ndarray, n_mels: int = 80, padding: int = 0) -> np.ndarray:
    """Straightforward librosa version of Whisper's features, (n_frames, n_mels)."""
    audio = np.pad(audio.astype(np.float32), (0, padding))
    stft = librosa.stft(audio, n_fft=400, hop_length=160, window="hann", center=True,
                        pad_mode="reflect")
    power = np.abs(stft[:, :-1]) ** 2
    mel = librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels) @ power
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).T


FORMATS = [  # (extension, soundfile keyword arguments)
    ("wav", {}),
    ("flac", {}),
    ("ogg", {"format": "OGG", "subtype": "VORBIS"}),
    ("sph", {"format": "NIST", "subtype": "PCM_16"}),
]


@pytest.mark.parametrize("ext,kwargs", FORMATS)
@pytest.mark.parametrize("sr,channels", [(44100, 2), (8000, 1)])
def test_load_file_types(tmp_path, ext, kwargs, sr, channels):
    path = tmp_path / f"tone.{ext}"
    sf.write(path, tone(sr, 1.5, channels), sr, **kwargs)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - int(1.5 * SAMPLE_RATE)) <= 1
    # stereo is averaged: channel amplitudes 0.25 and 0.5 give 0.375
    expected_peak = 0.375 if channels == 2 else 0.5
    assert abs(np.abs(audio[1000:-1000]).max() - expected_peak) < 0.02
    assert load_audio(str(path)).shape == audio.shape


def test_resampled_tone_keeps_pitch(tmp_path):
    path = tmp_path / "tone.wav"
    sf.write(path, tone(44100, 2.0, 2), 44100)
    audio = load_audio(path)
    spectrum = np.abs(np.fft.rfft(audio))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / len(audio)
    assert abs(peak_hz - 440) < 1


def test_array_inputs():
    mono = tone(SAMPLE_RATE, 0.5, 1)[:, 0]
    stereo = tone(SAMPLE_RATE, 0.5, 2)
    np.testing.assert_array_equal(load_audio(mono), mono)
    np.testing.assert_allclose(load_audio(mx.array(mono)), mono)
    np.testing.assert_allclose(load_audio(stereo), stereo.mean(axis=1), atol=1e-7)
    np.testing.assert_allclose(load_audio(stereo.T), stereo.mean(axis=1), atol=1e-7)
    ints = load_audio(np.array([0, 16384, -32768], dtype=np.int16))
    np.testing.assert_array_equal(ints, np.array([0, 0.5, -1.0], dtype=np.float32))
    assert load_audio(np.zeros(0, np.float32)).shape == (0,)
    with pytest.raises(AudioError, match="1-D or 2-D"):
        load_audio(np.zeros((2, 2, 2), np.float32))


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match=re.escape(f"audio file not found: {missing}")):
        load_audio(missing)


def test_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio at all")
    with pytest.raises(AudioError, match=re.escape(f"cannot decode {path} as audio: ")):
        load_audio(path)
    with pytest.raises(AudioError, match=re.escape(f"cannot decode {tmp_path} as audio: ")):
        load_audio(tmp_path)


def test_non_finite(tmp_path):
    with pytest.raises(AudioError, match="audio contains NaN or infinite samples"):
        load_audio(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(AudioError, match="audio contains NaN or infinite samples"):
        load_audio(mx.array([0.0, np.inf]))
    path = tmp_path / "nan.wav"
    sf.write(path, np.array([0.0, np.nan, 0.5], np.float32), 44100, subtype="FLOAT")
    with pytest.raises(AudioError, match=re.escape(f"audio contains NaN or infinite samples in {path}")):
        load_audio(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros((0, 2), np.float32), 44100)
    audio = load_audio(path)
    assert audio.shape == (0,) and audio.dtype == np.float32
    assert log_mel_spectrogram(audio).shape == (0, 80)
    assert log_mel_spectrogram(audio, padding=N_SAMPLES).shape == (N_FRAMES, 80)


def test_pad_or_trim():
    x = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(pad_or_trim(x, 4), x[:4])
    np.testing.assert_array_equal(pad_or_trim(x, 12), np.concatenate([x, [0, 0]]))
    assert pad_or_trim(x).shape == (N_SAMPLES,)
    m = mx.ones((3, 5))
    assert isinstance(pad_or_trim(m, 8), mx.array)
    assert pad_or_trim(m, 8).shape == (3, 8) and pad_or_trim(m, 2, axis=0).shape == (2, 5)
    np.testing.assert_array_equal(np.array(pad_or_trim(m, 7))[:, 5:], 0)
    assert pad_or_trim(np.ones((4, 80)), N_FRAMES, axis=0).shape == (N_FRAMES, 80)


def test_mel_shapes_and_silence():
    audio = np.random.default_rng(0).standard_normal(N_SAMPLES).astype(np.float32) * 0.1
    mel = log_mel_spectrogram(audio)
    assert isinstance(mel, mx.array) and mel.dtype == mx.float32
    assert mel.shape == (N_FRAMES, 80)
    assert log_mel_spectrogram(audio, n_mels=128).shape == (N_FRAMES, 128)
    assert log_mel_spectrogram(audio[:16000], padding=N_SAMPLES).shape == (N_FRAMES + 100, 80)
    silence = np.array(log_mel_spectrogram(np.zeros(N_SAMPLES, np.float32)))
    assert np.isfinite(silence).all()
    np.testing.assert_allclose(silence, (-10 + 4) / 4)
    assert mel_filters(80).shape == (80, 201) and mel_filters(128) is mel_filters(128)


@pytest.mark.parametrize("n_mels,padding", [(80, 0), (80, 160), (128, N_SAMPLES)])
def test_mel_matches_librosa_reference(n_mels, padding):
    rng = np.random.default_rng(1)
    t = np.arange(7 * SAMPLE_RATE + 123) / SAMPLE_RATE
    audio = (0.3 * np.sin(2 * np.pi * 300 * t * (1 + t)) + 0.05 * rng.standard_normal(t.size))
    audio[: SAMPLE_RATE // 2] *= 1e-4  # a near-silent stretch exercises the max - 8 floor
    audio = audio.astype(np.float32)
    ours = np.array(log_mel_spectrogram(audio, n_mels=n_mels, padding=padding))
    ref = reference_log_mel(audio, n_mels, padding)
    assert ours.shape == ref.shape == ((audio.size + padding) // 160, n_mels)
    assert np.abs(ours - ref).max() < 2e-6


@needs_shared
def test_real_flac_jfk():
    path = SHARED / "data" / "english" / "jfk.flac"
    audio = load_audio(path)
    assert audio.ndim == 1 and audio.dtype == np.float32
    assert abs(len(audio) - 11 * SAMPLE_RATE) <= 1
    assert 0.05 < np.sqrt(np.mean(audio ** 2)) < 0.5
    mel = np.array(log_mel_spectrogram(path))
    assert mel.shape == (len(audio) // 160, 80)
    assert np.abs(mel - reference_log_mel(audio)).max() < 2e-6


@needs_shared
def test_real_mp3():
    path = sorted((SHARED / "data" / "hausa" / "clips").glob("*.mp3"))[0]
    native, native_sr = sf.read(path, dtype="float32")
    audio = load_audio(path)
    assert audio.ndim == 1 and audio.dtype == np.float32
    assert abs(len(audio) - round(len(native) * SAMPLE_RATE / native_sr)) <= 1
    assert np.abs(audio).max() > 0.01
