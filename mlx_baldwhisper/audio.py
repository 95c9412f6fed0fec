"""Audio loading and Whisper's log-Mel front end, without ffmpeg.

Decoding uses soundfile (libsndfile reads wav, flac, mp3, ogg, NIST sphere, ...), with
``librosa.load`` as a fallback. The spectrogram is computed in float64 NumPy so that the
features match the reference float32 PyTorch/NumPy front ends to ~1e-6.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import Union

import mlx.core as mx
import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a 30 s window
N_SAMPLES_PER_TOKEN = HOP_LENGTH * 2  # the encoder's conv stride halves the frame rate
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 10 ms per frame
TOKENS_PER_SECOND = SAMPLE_RATE // N_SAMPLES_PER_TOKEN  # 20 ms per audio token

# Native sample rates we accept: beyond telephone (8 kHz) and studio (768 kHz) audio a
# header is hostile or broken, and resampling from 1 Hz would multiply the length 16000x.
MIN_RATE, MAX_RATE = 1000, 768_000
# Files are decoded and mixed to mono this many frames at a time, so memory follows the
# mono length (a 6-channel file costs no more than a mono one), not the header's claims.
BLOCK_FRAMES = 1 << 15

# soxr "HQ": measured on a 60 s 44.1 kHz file it takes ~8 ms, is as close to faster-whisper's
# PyAV/swresample output (~74 dB SNR) as soxr_vhq/mq, and far faster than kaiser/fft/scipy.
RESAMPLE_TYPE = "soxr_hq"

AudioInput = Union[str, os.PathLike, np.ndarray, mx.array]


class AudioError(ValueError):
    """Raised for audio that is missing, undecodable or not finite; the message says which."""


def load_audio(file_or_array: AudioInput, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Return mono float32 samples at ``sr`` Hz.

    Paths are decoded at their native rate, averaged to mono and resampled to ``sr``.
    Arrays (NumPy or MLX) are taken to be at ``sr`` already and are not resampled. They
    may be 1-D, or 2-D with the *shorter* axis as channels, so both soundfile's
    ``(n_samples, channels)`` and librosa's ``(channels, n_samples)`` layouts work.
    Integer arrays are scaled from their full range to [-1, 1). Empty audio is allowed.
    """
    if isinstance(file_or_array, (str, os.PathLike)):
        return _decode_file(os.fspath(file_or_array), sr)
    return _check_finite(_array_to_mono(file_or_array), "")


def _check_finite(audio: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(audio).all():
        raise AudioError(f"audio contains NaN or infinite samples{where}")
    return np.ascontiguousarray(audio, dtype=np.float32)


def _decode_file(path: str, sr: int) -> np.ndarray:
    if not os.path.exists(path):
        raise AudioError(f"audio file not found: {path}")
    if os.path.isdir(path):
        raise AudioError(f"cannot decode {path} as audio: it is a directory")
    if not os.path.isfile(path):  # a pipe or a device could be read forever
        raise AudioError(f"cannot decode {path} as audio: it is not a regular file")
    try:
        audio, native_sr = _read_mono(path)
    except Exception as sf_err:  # libsndfile can't read it; try librosa's other backends
        try:
            import librosa

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                audio, native_sr = librosa.load(path, sr=None, mono=True, dtype=np.float32)
        except Exception:
            raise AudioError(f"cannot decode {path} as audio: {str(sf_err).rstrip('.')}; the "
                             f"file may be truncated, or not audio at all") from sf_err
    audio = _check_finite(audio, f" in {path}")  # before resampling smears NaNs everywhere
    return resample(audio, int(native_sr), sr, where=f" of {path}")


def _read_mono(path: str) -> tuple[np.ndarray, int]:
    """Decode with libsndfile, mixing each block of frames down to mono as it comes."""
    import soundfile as sf

    blocks = []
    with sf.SoundFile(path) as f:
        while True:
            block = f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
            if not len(block):
                break
            blocks.append(block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0])
        native_sr = f.samplerate
    return (np.concatenate(blocks) if blocks else np.zeros(0, np.float32)), native_sr


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE, where: str = "") -> np.ndarray:
    """Resample mono float audio with soxr (via librosa); a no-op if the rates agree."""
    for rate in (orig_sr, target_sr):
        if not MIN_RATE <= rate <= MAX_RATE:
            raise AudioError(f"unsupported sample rate {rate} Hz{where} "
                             f"(audio from {MIN_RATE} to {MAX_RATE} Hz can be read)")
    if orig_sr == target_sr or audio.size == 0:
        return audio.astype(np.float32, copy=False)
    import librosa

    out = librosa.resample(audio, orig_sr=orig_sr, target_sr=target_sr, res_type=RESAMPLE_TYPE)
    return out.astype(np.float32, copy=False)


def _as_numpy(array: np.ndarray | mx.array) -> np.ndarray:
    if isinstance(array, mx.array):  # numpy has no bfloat16
        return np.array(array.astype(mx.float32) if array.dtype == mx.bfloat16 else array)
    try:
        return np.asarray(array)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise AudioError(f"audio must be an array of samples: {e}") from None


def _array_to_mono(array: np.ndarray | mx.array) -> np.ndarray:
    audio = _as_numpy(array)
    if np.issubdtype(audio.dtype, np.unsignedinteger):  # centred on half the range (8-bit WAV)
        half = float(np.iinfo(audio.dtype).max // 2 + 1)
        audio = (audio.astype(np.float64) - half) / half
    elif np.issubdtype(audio.dtype, np.integer):
        audio = audio.astype(np.float64) / float(np.iinfo(audio.dtype).max + 1)
    elif not np.issubdtype(audio.dtype, np.floating):
        raise AudioError(f"audio array must be float or integer, got dtype {audio.dtype}")
    if audio.ndim == 2 and 0 in audio.shape:
        return np.zeros(0, np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=0 if audio.shape[0] < audio.shape[1] else 1)
    elif audio.ndim != 1:
        raise AudioError(f"audio array must be 1-D or 2-D (samples x channels), got shape {audio.shape}")
    with np.errstate(over="ignore"):  # beyond float32: infinite, and refused as such
        return audio.astype(np.float32, copy=False)


def pad_or_trim(array: np.ndarray | mx.array, length: int = N_SAMPLES, axis: int = -1):
    """Zero-pad at the end, or cut, ``array`` along ``axis`` to exactly ``length`` items."""
    n = array.shape[axis]
    if n == length:
        return array
    axis = axis % array.ndim
    if n > length:
        index = tuple(slice(None) if d != axis else slice(0, length) for d in range(array.ndim))
        return array[index]
    widths = [(0, 0) if d != axis else (0, length - n) for d in range(array.ndim)]
    if isinstance(array, mx.array):
        return mx.pad(array, widths)
    return np.pad(array, widths)


@lru_cache(maxsize=None)
def mel_filters(n_mels: int = 80) -> np.ndarray:
    """Slaney-normalised Mel filterbank ``(n_mels, N_FFT // 2 + 1)``, float32 as Whisper ships it."""
    import librosa

    filters = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels).astype(np.float32)
    filters.setflags(write=False)  # cached and shared: nobody may modify it
    return filters


@lru_cache(maxsize=1)
def _hann_window() -> np.ndarray:
    # periodic Hann (torch.hann_window default): the period is N_FFT, not N_FFT - 1
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)


def log_mel_spectrogram(audio: AudioInput, n_mels: int = 80, padding: int = 0,
                        block_frames: int = 4096) -> mx.array:
    """Whisper's log-Mel features, shape ``(n_frames, n_mels)`` float32, n_frames = len // 160.

    ``padding`` zero samples are appended first (openai-whisper pads N_SAMPLES, faster-whisper
    160). STFT: periodic Hann, n_fft 400, hop 160, centred with reflect padding, power |X|^2,
    last frame dropped. Then log10 clamped at 1e-10, floored at (max - 8), scaled (x + 4) / 4.
    Frames are processed in blocks of ``block_frames`` to keep memory low on long files.
    """
    samples = load_audio(audio)
    if padding > 0:
        samples = np.pad(samples, (0, padding))
    n_frames = samples.shape[0] // HOP_LENGTH  # one more frame is computed, then dropped
    if n_frames == 0:
        return mx.zeros((0, n_mels), dtype=mx.float32)

    half = N_FFT // 2
    padded = np.pad(samples, (half, half), mode="reflect")  # float32: float64 block by block
    del samples  # the zero-padded copy, if any
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:n_frames]
    window = _hann_window()
    filters_t = mel_filters(n_mels).T.astype(np.float64)

    mel = np.empty((n_frames, n_mels), dtype=np.float64)
    for start in range(0, n_frames, block_frames):
        spec = np.fft.rfft(frames[start:start + block_frames] * window, axis=-1)
        power = spec.real ** 2 + spec.imag ** 2
        mel[start:start + block_frames] = power @ filters_t
    del frames, padded

    # in place: a 2-h file's float64 mel is 460 MB (the same values as out of place)
    np.log10(np.maximum(mel, 1e-10, out=mel), out=mel)
    np.maximum(mel, mel.max() - 8.0, out=mel)
    mel += 4.0
    mel /= 4.0
    return mx.array(mel.astype(np.float32))
