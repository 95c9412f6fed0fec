"""Self-attention key/value cache for incremental decoding.

Keys and values are kept split by head, ``(batch, heads, time, head_dim)``, which is
the layout attention multiplies with: a step reads the history as a strided view and
never copies or transposes it (on the CPU backend a transposing copy of the history
costs more than the attention itself). The buffer grows in fixed steps of 64
positions; a step writes only its new keys, in place (slice assignment into a buffer
that nothing else holds), so decoding does not re-allocate the history every token.

The numpy decoding step (cpu_decode.py) keeps the same layout in numpy buffers
(``update_numpy``); a cache switches storage if the other kind of step uses it.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np


class KVCache:
    step = 64

    def __init__(self, batch: int, max_len: int, n_state: int, n_head: int = 1):
        if n_state % n_head:
            raise ValueError(f"n_state {n_state} is not a multiple of n_head {n_head}")
        self.batch, self.max_len, self.n_state, self.n_head = batch, max_len, n_state, n_head
        self._k: Optional[mx.array | np.ndarray] = None  # (batch, heads, capacity, head_dim)
        self._v: Optional[mx.array | np.ndarray] = None
        self.offset = 0

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    def _split(self, x: mx.array) -> mx.array:
        b, t, d = x.shape
        return x.reshape(b, t, self.n_head, d // self.n_head).transpose(0, 2, 1, 3)

    def _merge(self, x: mx.array) -> mx.array:
        b, h, t, d = x.shape
        return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)

    def _reserve(self, end: int, like_k, like_v, zeros=mx.zeros) -> None:
        """Grow the buffers (MLX or numpy, by ``zeros``) in steps so ``end`` fits."""
        if self._k is not None and end <= self._k.shape[2]:
            return
        size = min(self.max_len, -(-end // self.step) * self.step)
        size = max(size, end)
        b, h, _, d = like_k.shape
        new_k = zeros((b, h, size, d), like_k.dtype)
        new_v = zeros((b, h, size, like_v.shape[-1]), like_v.dtype)
        if self._k is not None and self.offset:
            new_k[:, :, : self.offset] = self._k[:, :, : self.offset]
            new_v[:, :, : self.offset] = self._v[:, :, : self.offset]
        self._k, self._v = new_k, new_v

    def update_heads(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append head-split ``(batch, heads, t, head_dim)`` keys/values; returns the
        whole history in the same layout (views of the buffer)."""
        if isinstance(self._k, np.ndarray):
            self._k, self._v = mx.array(self._k), mx.array(self._v)
        end = self.offset + k.shape[2]
        self._reserve(end, k, v)
        self._k[:, :, self.offset : end] = k
        self._v[:, :, self.offset : end] = v
        self.offset = end
        return self._k[:, :, :end], self._v[:, :, :end]

    def update_numpy(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``update_heads`` with numpy arrays and numpy buffers (written in place)."""
        if self._k is not None and not isinstance(self._k, np.ndarray):
            self._k, self._v = np.array(self._k), np.array(self._v)
        end = self.offset + k.shape[2]
        self._reserve(end, k, v, zeros=lambda shape, _dtype: np.zeros(shape, np.float32))
        self._k[:, :, self.offset : end] = k
        self._v[:, :, self.offset : end] = v
        self.offset = end
        return self._k[:, :, :end], self._v[:, :, :end]

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append ``(batch, t, n_state)`` keys/values; returns the history as
        ``(batch, offset, n_state)``."""
        k, v = self.update_heads(self._split(k), self._split(v))
        return self._merge(k), self._merge(v)

    @property
    def keys(self) -> Optional[mx.array]:
        """The buffer as ``(batch, capacity, n_state)`` (a view, for inspection)."""
        return None if self._k is None else self._merge(mx.array(self._k))

    @property
    def values(self) -> Optional[mx.array]:
        return None if self._v is None else self._merge(mx.array(self._v))

    def reorder(self, index: mx.array) -> None:
        """Beam search: keep the histories of the surviving hypotheses."""
        if isinstance(self._k, np.ndarray):
            index = np.asarray(index)
        if self._k is not None:
            self._k = self._k[index]
            self._v = self._v[index]

    def rewind(self, offset: int) -> None:
        self.offset = offset
