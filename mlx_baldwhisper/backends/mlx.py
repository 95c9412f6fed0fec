"""Attention in MLX, the kernel hook the model calls, and incremental decoding in MLX.

:func:`attention` is the one definition of the model's attention; other backends
compute the same thing (backends/cpu/ops.py is its numpy twin) and plug in through
:class:`Kernels`, which the model reads at every call: :func:`installed` sets it for
a forward pass that is not differentiated, so training and transforms see plain MLX.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

NEG_INF = -1e9  # added to a masked score: exp() of it is exactly 0 in float32


def causal_mask(t: int, offset: int, dtype: mx.Dtype) -> mx.array:
    """Additive (t, offset + t) mask: new token i sees the history and new tokens <= i."""
    rows = mx.arange(offset, offset + t)[:, None]
    cols = mx.arange(offset + t)[None, :]
    return mx.where(cols > rows, mx.array(NEG_INF, dtype=dtype), mx.array(0, dtype=dtype))


def attention(q: mx.array, k: mx.array, v: mx.array, mask: Optional[mx.array] = None,
              key_padding_mask: Optional[mx.array] = None) -> tuple[mx.array, mx.array]:
    """softmax(q·kᵀ + mask)·v on head-split ``(batch, heads, time, head_dim)`` arrays.

    q and k are each already scaled by head_dim^-¼ (keys are scaled once, then cached).
    ``mask``: additive ``(t_q, t_k)`` (:func:`causal_mask`); ``key_padding_mask``:
    ``(batch, t_k)``, True where a key is padding. Returns (output, masked scores q·kᵀ).
    """
    qk = q @ k.swapaxes(-1, -2)
    if mask is not None:
        qk = qk + mask
    if key_padding_mask is not None:
        pad = mx.where(key_padding_mask, mx.array(NEG_INF, qk.dtype), mx.array(0, qk.dtype))
        qk = qk + pad[:, None, None, :]
    w = mx.softmax(qk.astype(mx.float32), axis=-1, precise=True).astype(q.dtype)
    return w @ v, qk


class Kernels(NamedTuple):
    """The model's replaceable pieces: the same math, computed by another backend.
    ``attention`` has :func:`attention`'s signature and may return None for the scores."""

    attention: Callable[..., tuple[mx.array, Optional[mx.array]]]
    gelu: Callable[[mx.array], mx.array]


MLX_KERNELS = Kernels(attention, nn.gelu)
_current: contextvars.ContextVar[Kernels] = contextvars.ContextVar(
    "mlx_baldwhisper_kernels", default=MLX_KERNELS)


def kernels() -> Kernels:
    """The kernels in use (MLX's unless a backend installed its own)."""
    return _current.get()


@contextlib.contextmanager
def installed(k: Kernels) -> Iterator[None]:
    token = _current.set(k)
    try:
        yield
    finally:
        _current.reset(token)


class MLXInference:
    """Decoding state in MLX: one KV cache per decoder layer and the encoder's keys/values
    per layer, computed at the first step. ``model`` is a :class:`~mlx_baldwhisper.model.Whisper`."""

    def __init__(self, model: Any, batch: int, audio_padding: Optional[mx.array] = None):
        self.decoder = model.decoder
        self.caches = model.new_caches(batch)
        self.cross: Optional[list] = None
        self.audio_padding = audio_padding

    def logits(self, tokens: mx.array, audio_features: mx.array) -> mx.array:
        """Logits ``(batch, t, vocab)`` for ``tokens``, the sequences' next ``t`` tokens."""
        logits, self.cross, _ = self.decoder(tokens, audio_features, self.caches, self.cross,
                                             audio_padding=self.audio_padding)
        return logits

    def reorder(self, index: np.ndarray) -> None:
        """Beam search: keep the histories of the surviving hypotheses."""
        index = mx.array(index)
        for cache in self.caches:
            cache.reorder(index)
