"""Self-attention key/value cache for incremental decoding.

The buffer grows in fixed steps and new keys are written in place with slice
assignment, so a decoding step does not re-allocate the whole history.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    step = 64

    def __init__(self, batch: int, max_len: int, n_state: int):
        self.batch, self.max_len, self.n_state = batch, max_len, n_state
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        t = k.shape[1]
        end = self.offset + t
        if self.keys is None or end > self.keys.shape[1]:
            size = min(self.max_len, ((end + self.step - 1) // self.step) * self.step)
            size = max(size, end)
            shape = (k.shape[0], size, k.shape[2])
            new_k, new_v = mx.zeros(shape, k.dtype), mx.zeros(shape, v.dtype)
            if self.keys is not None and self.offset:
                new_k[:, : self.offset] = self.keys[:, : self.offset]
                new_v[:, : self.offset] = self.values[:, : self.offset]
            self.keys, self.values = new_k, new_v
        self.keys[:, self.offset : end] = k
        self.values[:, self.offset : end] = v
        self.offset = end
        return self.keys[:, :end], self.values[:, :end]

    def reorder(self, index: mx.array) -> None:
        """Beam search: keep the histories of the surviving hypotheses."""
        if self.keys is not None:
            self.keys = self.keys[index]
            self.values = self.values[index]

    def rewind(self, offset: int) -> None:
        self.offset = offset
