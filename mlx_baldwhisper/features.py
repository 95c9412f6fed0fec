"""A cache of encoder outputs per clip.

All BaldWhisper stages train only the decoder, so a frozen encoder runs once per clip
and its outputs are reused by every step, every stage and every evaluation: that is
what makes decoder-only training affordable on a laptop CPU.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .audio import AudioError
from .dataset import ClipTooLongError, load_mel

log = logging.getLogger(__name__)


def encoder_fingerprint(model: Any) -> str:
    """A cheap identity for a model's encoder (dims, dtype and per-tensor sums), for
    ``FeatureCache`` keys when the caller has no better name."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    d = model.dims
    h = hashlib.sha1(f"{d.n_mels},{d.n_audio_ctx},{d.n_audio_state},{d.n_audio_layer},{model.dtype}".encode())
    for name, w in tree_flatten(model.encoder.parameters()):
        s = mx.sum(w.astype(mx.float32)).item()
        h.update(f"{name}{tuple(w.shape)}{s:.6e}".encode())
    return h.hexdigest()[:16]


def encode_mels(model: Any, mels: np.ndarray) -> np.ndarray:
    """Run the encoder on ``(B, N_FRAMES, n_mels)`` mels; float16 numpy features."""
    import mlx.core as mx

    feats = model.embed_audio(mx.array(mels).astype(model.dtype)).astype(mx.float16)
    mx.eval(feats)
    return np.array(feats)


class FeatureCache:
    """Encoder outputs per clip, in memory and optionally as ``{directory}/{hash}.npy``.

    The key hashes the clip's name (its path) together with ``encoder_id``, so features
    of a different encoder are never confused. With a directory and
    ``keep_in_memory=False``, features are memory-mapped from disk instead of held in RAM.
    """

    def __init__(self, encoder_id: str, directory: Union[str, os.PathLike, None] = None,
                 keep_in_memory: bool = True):
        self.encoder_id = encoder_id
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_in_memory = keep_in_memory
        self._memory: dict[str, np.ndarray] = {}

    def _hash(self, item: Any) -> str:
        name = item if isinstance(item, str) else item.name
        return hashlib.sha1(f"{self.encoder_id}\n{name}".encode()).hexdigest()

    def _file(self, h: str) -> Optional[Path]:
        return self.directory / f"{h}.npy" if self.directory is not None else None

    def __contains__(self, item: Any) -> bool:
        h = self._hash(item)
        f = self._file(h)
        return h in self._memory or (f is not None and f.exists())

    def __len__(self) -> int:
        return len(self._memory)

    def get(self, item: Any) -> np.ndarray:
        h = self._hash(item)
        if h in self._memory:
            return self._memory[h]
        f = self._file(h)
        if f is None or not f.exists():
            raise KeyError(f"no cached features for {item if isinstance(item, str) else item.name}")
        arr = np.load(f, mmap_mode=None if self.keep_in_memory else "r")
        if self.keep_in_memory:
            self._memory[h] = arr
        return arr

    def put(self, item: Any, features: np.ndarray) -> None:
        h = self._hash(item)
        features = np.asarray(features, np.float16)
        if self.keep_in_memory or self.directory is None:
            self._memory[h] = features
        f = self._file(h)
        if f is not None:
            tmp = f.with_name(f"{h}.{os.getpid()}.tmp.npy")
            np.save(tmp, features)
            os.replace(tmp, f)

    def stack(self, items: Sequence[Any]) -> np.ndarray:
        return np.stack([self.get(x) for x in items])

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
                    for x, f in zip(ok, encode_mels(model, np.stack(mels))):
                        self.put(x, f)
                bar.update(len(todo[b:b + batch_size]))
        return skipped
