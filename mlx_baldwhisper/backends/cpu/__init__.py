"""The Linux CPU backend: numpy kernels where MLX's CPU backend is slow.

:func:`inference` installs the numpy attention and GELU (ops.py) for a forward pass
that is not differentiated (the encoder, a frozen teacher, MLX decoding steps); a
float32 decoder decodes entirely in numpy (decode.py); training losses have numpy
kernels too (losses.py). Used on the CPU device on Linux; ``MLX_BALDWHISPER_CPU_OPS=numpy``
forces it anywhere, ``=mlx`` turns it off. Inside :func:`inference`, numpy's own BLAS
runs single-threaded per calling thread (``MLX_BALDWHISPER_CPU_THREADS`` to change):
beside MLX's worker thread on a 2-core machine, more BLAS threads only contend; the
encoder's parallelism comes from the pool in ops.py instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import mlx.core as mx
import numpy as np

from ..mlx import installed, kernels
from . import ops

ENV_VAR = "MLX_BALDWHISPER_CPU_OPS"


def _numpy_blas():
    """threadpoolctl's handle on numpy's own BLAS (not the one MLX uses), or None."""
    try:
        from threadpoolctl import ThreadpoolController

        ctl = ThreadpoolController()
        here = os.path.dirname(np.__file__)
        prefixes = [i["prefix"] for i in ctl.info()
                    if i["user_api"] == "blas" and os.path.dirname(i["filepath"]).startswith(here)]
        return ctl.select(prefix=prefixes) if prefixes else None
    except Exception:  # pragma: no cover - threadpoolctl missing or unusual build
        return None


_pools = _numpy_blas()


def enabled() -> bool:
    """Whether the numpy kernels apply on this platform/device (env var overrides)."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower()
    if choice in ("numpy", "1", "on", "true"):
        return True
    if choice in ("mlx", "0", "off", "false"):
        return False
    return sys.platform.startswith("linux") and mx.default_device().type == mx.DeviceType.cpu


def active() -> bool:
    """True inside :func:`inference` when the numpy kernels apply."""
    return kernels() is ops.KERNELS


@contextlib.contextmanager
def inference() -> Iterator[None]:
    """Marks a forward pass that is not differentiated: the numpy kernels serve it, if enabled."""
    if not enabled():
        yield
        return
    limit = contextlib.nullcontext()
    if _pools is not None:
        limit = _pools.limit(limits=int(os.environ.get("MLX_BALDWHISPER_CPU_THREADS", "1")),
                             user_api="blas")
    with limit, installed(ops.KERNELS):
        yield
