"""The one seam between the model and the platform's fast code.

The model (model.py) is plain MLX and calls attention and GELU through the kernel hook
of backends/mlx.py. This package decides what serves inference: :func:`inference`
installs the CPU backend's numpy kernels on Linux CPU (backends/cpu), :func:`encode`
runs the encoder under them, and :func:`decoding` hands decoding its state object:
the numpy step for a float32 decoder there, MLX's KV caches otherwise.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator, Optional, Protocol

import mlx.core as mx
import numpy as np

from .. import _blas
from . import cpu
from .cpu.decode import NumpyInference
from .cpu.ops import TRANSFORM_ERRORS
from .mlx import MLXInference


class Inference(Protocol):
    """What decoding calls: the next logits of every sequence, and beam reordering."""

    def logits(self, tokens: mx.array, audio_features: mx.array) -> mx.array: ...

    def reorder(self, index: np.ndarray) -> None: ...


def inference() -> ContextManager[None]:
    """Marks a forward pass that is not differentiated: the platform's fast kernels may
    serve it (their gradients would still be exact)."""
    return cpu.inference()


def encode(encoder: Callable[[mx.array], mx.array], mel: mx.array) -> mx.array:
    """``encoder(mel)`` for inference, evaluated under the fast kernels and with the
    encoder's BLAS threads (``_blas.threads``), which decoding steps do not keep."""
    with cpu.inference(), _blas.threads(_blas.encoder_threads()):
        out = encoder(mel)
        try:
            mx.eval(out)
        except TRANSFORM_ERRORS:  # inside mx.compile/vmap: stays lazy
            pass
    return out


@contextlib.contextmanager
def decoding(model: Any, batch: int, audio_padding: Optional[mx.array] = None
             ) -> Iterator[Inference]:
    """Decoding state for ``batch`` sequences of ``model`` (a Whisper), inside :func:`inference`.
    ``audio_padding`` (batch, positions): True for padded encoder positions."""
    with cpu.inference():
        if cpu.active() and NumpyInference.supports(model.decoder):
            yield NumpyInference(model.decoder, batch, audio_padding)
        else:
            yield MLXInference(model, batch, audio_padding)
