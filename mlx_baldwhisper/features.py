"""A cache of encoder outputs per clip, which can never serve features that are stale.

All BaldWhisper stages train only the decoder, so a frozen encoder runs once per clip
and its outputs are reused by every step, every stage and every evaluation: that is
what makes decoder-only training affordable on a laptop CPU.

An entry's key hashes everything its features depend on: every byte of the encoder's
weights, its dimensions (mel bins, audio context) and dtype, the mel front end's
settings (:func:`encoder_fingerprint`), and the clip's content: the log-Mel input
itself, or the audio file's bytes, never only its path. Change any of them and the
clip is encoded again. Each file ends with a checksum of its data, so an entry that
is truncated or damaged is deleted and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .audio import HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE, AudioError
from .audio_context import AudioContext, encode_windows
from .dataset import ClipTooLongError, load_mel
from .diskspace import replace_file, size_text

log = logging.getLogger(__name__)

# An entry: the .npy bytes of the features, then MAGIC and the SHA-256 of those bytes.
MAGIC = b"MBWFEAT1"
_TRAILER = len(MAGIC) + 32
# Our files in a cache folder (named by key; an older layout used SHA-1 names) and the
# temp files a killed process can leave: --clear-cache deletes these and nothing else.
_OURS = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?(?:\.npy|\.\d+\.tmp|\.\d+\.tmp\.npy)")


def encoder_fingerprint(model: Any) -> str:
    """Identity of what turns a clip into features: a SHA-256 over the encoder's weights
    (every byte, with names, shapes and dtypes), its dimensions and dtype, and the mel
    front end's settings."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    d = model.dims
    h = hashlib.sha256(
        f"mel sr={SAMPLE_RATE} n_fft={N_FFT} hop={HOP_LENGTH} window={N_SAMPLES} n_mels={d.n_mels}; "
        f"encoder ctx={d.n_audio_ctx} state={d.n_audio_state} heads={d.n_audio_head} "
        f"layers={d.n_audio_layer} dtype={model.dtype}".encode())
    for name, w in tree_flatten(model.encoder.parameters()):
        w = mx.contiguous(w)
        mx.eval(w)
        h.update(f"\n{name} {w.dtype} {tuple(w.shape)}\n".encode())
        h.update(memoryview(w).cast("B"))
    return h.hexdigest()


def speech_frames(item: Any) -> int:
    """Mel frames of audio in a clip (its 30-s window when its duration is unknown)."""
    duration = getattr(item, "duration", None)
    if duration is None:
        return N_FRAMES
    return max(1, min(N_FRAMES, math.ceil(duration * SAMPLE_RATE / HOP_LENGTH)))


def encode_mels(model: Any, mels: np.ndarray, positions: Optional[Sequence[int]] = None,
                frames: Optional[Sequence[int]] = None) -> Union[np.ndarray, list[np.ndarray]]:
    """Run the encoder on ``(B, N_FRAMES, n_mels)`` mels; float16 numpy features.

    With ``positions`` (a short audio context per clip), each clip is encoded over its
    own positions, as transcription does: the mel past its ``frames`` of audio is
    zeroed, and the clips share one padded batch. Returns one array per clip then.
    """
    import mlx.core as mx

    if positions is None:
        positions = [np.shape(mels)[1] // 2] * len(mels)  # every frame, as given
        frames = None
    elif frames is None:
        frames = [N_FRAMES] * len(positions)
    feats, lengths = encode_windows(model, mels, positions, frames)
    feats = feats.astype(mx.float16)
    mx.eval(feats)
    out = np.array(feats)
    return out if frames is None else [out[i, :n] for i, n in enumerate(positions)]


def pad_stack(features: Sequence[np.ndarray]) -> tuple[np.ndarray, Optional[list[int]]]:
    """Features of clips as one zero-padded batch, and each clip's positions when they
    differ (a short audio context), else None."""
    lengths = [f.shape[0] for f in features]
    width = max(lengths)
    if min(lengths) == width:
        return np.stack(features), None
    out = np.zeros((len(features), width, features[0].shape[-1]), features[0].dtype)
    for i, f in enumerate(features):
        out[i, :len(f)] = f
    return out, lengths


def content_digest(item: Any) -> str:
    """What a clip holds: its log-Mel input when prepared (``.mel``), else the bytes of its
    audio file, or of its in-memory samples and rate. A string is an audio file's path."""
    audio = item if isinstance(item, (str, os.PathLike)) else None
    mel = getattr(item, "mel", None)
    if audio is None and mel is None:
        audio = item.audio
    h = hashlib.sha256()
    if mel is not None:
        mel = np.ascontiguousarray(mel)
        h.update(f"mel {mel.dtype} {mel.shape}\n".encode())
        h.update(memoryview(mel).cast("B"))
    elif isinstance(audio, tuple):
        samples, sr = audio
        samples = np.ascontiguousarray(samples)
        h.update(f"samples {samples.dtype} {samples.shape} sr={sr}\n".encode())
        h.update(memoryview(samples).cast("B"))
    else:
        h.update(b"file\n")
        with open(audio, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _entry(features: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, features)
    data = buf.getvalue()
    return data + MAGIC + hashlib.sha256(data).digest()


def _check_entry(raw: bytes) -> Optional[str]:
    """Why a cache file's bytes cannot be used, or None."""
    if len(raw) < _TRAILER or raw[-_TRAILER:-32] != MAGIC:
        return "it is truncated or not one of our entries"
    if hashlib.sha256(raw[:-_TRAILER]).digest() != raw[-32:]:
        return "its data does not match its checksum"
    return None


class FeatureCache:
    """Encoder outputs per clip, in memory and optionally as ``{directory}/{key}.npy``.

    ``encoder_id`` names the encoder (:func:`encoder_fingerprint`); each item's key adds
    its :func:`content_digest`. With a directory and ``keep_in_memory=False``, features
    are memory-mapped from disk (after their checksum passed) instead of held in RAM.
    ``context``: the audio context clips are encoded over (default: full 30-s windows);
    a short one keys each entry by the policy and the clip's length too.
    """

    def __init__(self, encoder_id: str, directory: Union[str, os.PathLike, None] = None,
                 keep_in_memory: bool = True, context: Optional[AudioContext] = None):
        self.encoder_id = encoder_id
        self.context = context or AudioContext()
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_in_memory = keep_in_memory
        self._memory: dict[str, np.ndarray] = {}
        self._checked: set[str] = set()  # files whose checksum passed (memory-mapped mode)
        self._digests: dict[int, tuple[Any, str]] = {}  # id(item) -> (item, digest)

    def _digest(self, item: Any) -> Optional[str]:
        """The item's content digest, computed once per item; None when unreadable."""
        if isinstance(item, (str, os.PathLike)):
            return self._read_digest(item)
        known = self._digests.get(id(item))
        if known is not None and known[0] is item:
            return known[1]
        digest = self._read_digest(item)
        if digest is not None:
            self._digests[id(item)] = (item, digest)
        return digest

    @staticmethod
    def _read_digest(item: Any) -> Optional[str]:
        try:
            return content_digest(item)
        except OSError:  # a missing or unreadable file: not cached; loading it says why
            return None

    def _key(self, item: Any) -> Optional[str]:
        digest = self._digest(item)
        if digest is None:
            return None
        ctx = "" if self.context.is_full else (
            f"\ncontext {sorted(self.context.to_dict().items())} frames {speech_frames(item)}")
        return hashlib.sha256(f"{self.encoder_id}\n{digest}{ctx}".encode()).hexdigest()

    def positions(self, item: Any, n_audio_ctx: int) -> int:
        """Encoder positions of ``item``'s features under this cache's audio context."""
        return self.context.positions_for(speech_frames(item), n_audio_ctx)

    def _file(self, key: str) -> Optional[Path]:
        return self.directory / f"{key}.npy" if self.directory is not None else None

    def _load(self, key: str) -> Optional[np.ndarray]:
        """The features on disk for ``key`` once their checksum passed; a damaged entry is
        deleted (and so recomputed by :meth:`compute`)."""
        f = self._file(key)
        if f is None:
            return None
        if key in self._checked:
            return np.load(f, mmap_mode="r")
        try:
            raw = f.read_bytes()
        except FileNotFoundError:
            return None
        reason = _check_entry(raw)
        if reason is None:
            try:
                arr = np.load(io.BytesIO(raw[:-_TRAILER]))
            except ValueError as e:
                reason = f"it does not parse ({e})"
        if reason is not None:
            log.warning("feature cache: %s is damaged (%s): deleting it; the clip is encoded again",
                        f, reason)
            f.unlink(missing_ok=True)
            return None
        if self.keep_in_memory:
            self._memory[key] = arr
            return arr
        self._checked.add(key)
        return np.load(f, mmap_mode="r")

    def __contains__(self, item: Any) -> bool:
        key = self._key(item)
        return key is not None and (key in self._memory or self._load(key) is not None)

    def __len__(self) -> int:
        return len(self._memory)

    def get(self, item: Any) -> np.ndarray:
        key = self._key(item)
        found = None if key is None else self._memory.get(key)
        if found is None and key is not None:
            found = self._load(key)
        if found is None:
            name = item if isinstance(item, (str, os.PathLike)) else item.name
            raise KeyError(f"no cached features for {name}")
        return found

    def put(self, item: Any, features: np.ndarray) -> None:
        key = self._key(item)
        if key is None:
            return
        features = np.asarray(features, np.float16)
        if self.keep_in_memory or self.directory is None:
            self._memory[key] = features
        f = self._file(key)
        if f is None:
            return
        replace_file(f, _entry(features), tmp=f.with_name(f"{key}.{os.getpid()}.tmp"))

    def stack(self, items: Sequence[Any]) -> tuple[np.ndarray, Optional[list[int]]]:
        """The items' features as one batch, and their lengths if they differ (pad_stack)."""
        return pad_stack([self.get(x) for x in items])

    def compute(self, model: Any, items: Sequence[Any], batch_size: int = 8,
                progress: bool = True) -> list[tuple[str, str]]:
        """Encode every item not cached yet; items need ``.mel`` or a loadable ``.audio``.

        Returns ``(name, reason)`` for clips that could not be loaded (and logs them).
        """
        from tqdm import tqdm

        todo = [x for x in items if x not in self]
        skipped: list[tuple[str, str]] = []
        with tqdm(total=len(todo), desc="encoding", unit="clip", disable=not progress) as bar:
            for b in range(0, len(todo), batch_size):
                ok, mels = [], []
                for x in todo[b:b + batch_size]:
                    try:
                        mels.append(x.mel if getattr(x, "mel", None) is not None
                                    else load_mel(x.audio, model.dims.n_mels))
                        ok.append(x)
                    except (AudioError, ClipTooLongError) as e:
                        log.warning("skipping %s: %s", x.name, e)
                        skipped.append((x.name, str(e)))
                if ok:
                    positions = frames = None
                    if not self.context.is_full:
                        frames = [speech_frames(x) for x in ok]
                        positions = [self.positions(x, model.dims.n_audio_ctx) for x in ok]
                    for x, f in zip(ok, encode_mels(model, np.stack(mels), positions, frames)):
                        self.put(x, f)
                bar.update(len(todo[b:b + batch_size]))
        return skipped

    # -- the folder as a whole -------------------------------------------------------

    def _own_files(self) -> list[Path]:
        if self.directory is None or not self.directory.is_dir():
            return []
        return [f for f in self.directory.iterdir() if f.is_file() and _OURS.fullmatch(f.name)]

    def disk_usage(self) -> tuple[int, int]:
        """(entries, bytes) of every cache file in the folder, for any model or audio."""
        files = self._own_files()
        return len(files), sum(f.stat().st_size for f in files)

    def size_report(self) -> str:
        if self.directory is None:
            return f"feature cache: {len(self)} clips in memory"
        n, size = self.disk_usage()
        return (f"feature cache {self.directory}: {n} entries, {size_text(size)} on disk "
                f"(--clear-cache empties it)")

    def clear(self) -> tuple[int, int]:
        """Delete every cache file in the folder (nothing else in it); (entries, bytes) freed."""
        n, size = self.disk_usage()
        for f in self._own_files():
            f.unlink(missing_ok=True)
        self._memory.clear()
        self._checked.clear()
        return n, size
