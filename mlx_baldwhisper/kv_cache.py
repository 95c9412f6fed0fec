"""The head-split layout of attention, and the self-attention key/value cache kept in it.

Keys and values are kept split by head, ``(batch, heads, time, head_dim)``, which is
the layout attention multiplies with: a step reads the history as a strided view and
never copies or transposes it (on the CPU backend a transposing copy of the history
costs more than the attention itself). The buffer grows in fixed steps of 64
positions; a step writes only its new keys, in place (slice assignment into a buffer
that nothing else holds), so decoding does not re-allocate the history every token.
The numpy decoding step (backends/cpu/decode.py) keeps its own numpy buffers, grown
by the same rule (:func:`grown`).
"""

from __future__ import annotations

from typing import Optional, TypeVar

import mlx.core as mx
import numpy as np

Array = TypeVar("Array", mx.array, np.ndarray)
STEP = 64


def split_heads(x: Array, n_head: int, scale: Optional[float] = None) -> Array:
    """(batch, time, width) -> (batch, heads, time, head_dim), optionally scaled; MLX or numpy."""
    b, t, d = x.shape
    if scale is not None:
        x = x * scale
    return x.reshape(b, t, n_head, d // n_head).transpose(0, 2, 1, 3)


def merge_heads(x: Array) -> Array:
    """(batch, heads, time, head_dim) -> (batch, time, width); MLX or numpy."""
    b, h, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def grown(end: int, max_len: int) -> int:
    """The capacity that holds ``end`` positions: the next multiple of STEP (within max_len)."""
    return max(end, min(max_len, -(-end // STEP) * STEP))


class KVCache:
    def __init__(self, batch: int, max_len: int, n_state: int, n_head: int = 1):
        if n_state % n_head:
            raise ValueError(f"n_state {n_state} is not a multiple of n_head {n_head}")
        self.batch, self.max_len, self.n_state, self.n_head = batch, max_len, n_state, n_head
        self._k: Optional[mx.array] = None  # (batch, heads, capacity, head_dim)
        self._v: Optional[mx.array] = None
        self.offset = 0

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    def _reserve(self, end: int, like_k: mx.array, like_v: mx.array) -> None:
        if end <= self.capacity:
            return
        size = grown(end, self.max_len)
        b, h, _, d = like_k.shape
        new_k = mx.zeros((b, h, size, d), like_k.dtype)
        new_v = mx.zeros((b, h, size, like_v.shape[-1]), like_v.dtype)
        if self._k is not None and self.offset:
            new_k[:, :, : self.offset] = self._k[:, :, : self.offset]
            new_v[:, :, : self.offset] = self._v[:, :, : self.offset]
        self._k, self._v = new_k, new_v

    def update_heads(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append head-split ``(batch, heads, t, head_dim)`` keys/values; returns the
        whole history in the same layout (views of the buffer)."""
        end = self.offset + k.shape[2]
        self._reserve(end, k, v)
        self._k[:, :, self.offset : end] = k
        self._v[:, :, self.offset : end] = v
        self.offset = end
        return self._k[:, :, :end], self._v[:, :, :end]

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append ``(batch, t, n_state)`` keys/values; returns the history as
        ``(batch, offset, n_state)``."""
        k, v = self.update_heads(split_heads(k, self.n_head), split_heads(v, self.n_head))
        return merge_heads(k), merge_heads(v)

    @property
    def keys(self) -> Optional[mx.array]:
        """The buffer as ``(batch, capacity, n_state)`` (for inspection)."""
        return None if self._k is None else merge_heads(self._k)

    def reorder(self, index: mx.array) -> None:
        """Beam search: keep the histories of the surviving hypotheses."""
        if self._k is not None:
            self._k = self._k[index]
            self._v = self._v[index]
