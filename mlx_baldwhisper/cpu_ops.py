"""Inference kernels for MLX's CPU backend on Linux, computed in numpy.

MLX's CPU element-wise kernels are scalar on Linux/x86 (``exp`` ~11 ns and ``erf``
~24 ns per element), so the encoder spends most of its time in the self-attention
softmax (8 x 1500 x 1500 per layer) and in GELU. numpy's ``exp`` is vectorised
(~0.4 ns per element) and numpy's matmul uses its own OpenBLAS, so this module
computes those two pieces in numpy, head by head and in blocks of query rows that
stay in cache (heads, and GELU rows, spread over a small thread pool sized like the
encoder's BLAS threads), and hands the result back to MLX. Matmuls of the projections, layer
norms and everything else stay in MLX (quantized layers included).

The numpy kernels are ``mx.custom_function``s whose backward pass is the plain MLX
computation, so gradients stay exact if one is ever taken through them; inside
``mx.compile``/``mx.vmap`` (where arrays cannot be read) they fall back to MLX.
They are only used inside :func:`inference` (``Whisper.embed_audio`` and incremental
decoding enter it), on the CPU device, on Linux. ``MLX_BALDWHISPER_CPU_OPS=numpy``
forces them anywhere, ``=mlx`` turns them off. For decoding, the cross-attention and
the vocabulary projection have kernels here (used by quantized decoders); a float32
decoder runs its whole step in numpy (cpu_decode.py). Inside :func:`inference`,
numpy's own BLAS runs single-threaded per calling thread (``MLX_BALDWHISPER_CPU_THREADS``
to change): beside MLX's worker thread on a 2-core machine, more BLAS threads only
contend; the encoder's parallelism comes from the pool instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import sys
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

ENV_VAR = "MLX_BALDWHISPER_CPU_OPS"
ROWS = 256  # query rows per softmax block: 256 x 1500 floats = 1.5 MB, stays in L2
# Below these sizes a numpy kernel does not pay for the host round trip (one MLX
# evaluation and thread hand-off each): GELU of a decoding step (batch x 2048), the
# cross-attention of one item (8 x 1500 x 64 keys) stay in MLX.
MIN_GELU = 1 << 17
MIN_ATTEND = 1 << 20

_inference = contextvars.ContextVar("mlx_baldwhisper_cpu_inference", default=False)

try:  # scipy ships with librosa; without it GELU stays in MLX
    from scipy.special import erf as _np_erf
except ImportError:  # pragma: no cover
    _np_erf = None


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
    return _inference.get() and enabled()


@contextlib.contextmanager
def inference() -> Iterator[None]:
    """Marks a forward pass that is not differentiated: the numpy kernels may run."""
    token = _inference.set(True)
    limit = contextlib.nullcontext()
    if _pools is not None and enabled():
        threads = int(os.environ.get("MLX_BALDWHISPER_CPU_THREADS", "1"))
        limit = _pools.limit(limits=threads, user_api="blas")
    try:
        with limit:
            yield
    finally:
        _inference.reset(token)


def host(x: mx.array) -> np.ndarray:
    """A zero-copy float32 numpy view of ``x`` (evaluates it). Raises inside a transform."""
    if x.dtype != mx.float32:
        x = x.astype(mx.float32)
    return np.asarray(memoryview(x))


_TRANSFORM_ERRORS = (RuntimeError, ValueError)


# ---- a small thread pool for the encoder's kernels --------------------------------------

_pool = None


def _workers() -> int:
    """Threads for the big numpy kernels (encoder attention and GELU): as many as the
    encoder's BLAS threads. numpy releases the GIL in its loops and BLAS calls; each
    thread's numpy BLAS stays single-threaded (see :func:`inference`)."""
    from . import _blas

    return max(1, _blas.encoder_threads() or 1)


def _run_parallel(tasks: list) -> None:
    """Run independent tasks that write disjoint output slices on ``_workers()`` threads."""
    global _pool
    n = _workers()
    if n <= 1 or len(tasks) <= 1:
        for t in tasks:
            t()
        return
    if _pool is None or _pool._max_workers != n:
        from concurrent.futures import ThreadPoolExecutor
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="mlxbw-cpu")
    for f in [_pool.submit(t) for t in tasks]:
        f.result()


# ---- GELU (exact, erf form) -----------------------------------------------------------

def _gelu_mlx(x: mx.array) -> mx.array:
    return nn.gelu(x)  # x * (1 + erf(x / √2)) / 2


def _gelu_rows(a: np.ndarray, out: np.ndarray) -> None:
    np.divide(a, np.float32(math.sqrt(2)), out=out)
    _np_erf(out, out=out)
    out += 1
    out *= a
    out *= np.float32(0.5)


def _gelu_numpy(a: np.ndarray) -> np.ndarray:
    out = np.empty_like(a)
    rows, cols = a.reshape(-1, a.shape[-1]), out.reshape(-1, a.shape[-1])
    # Split across threads only when large (the encoder): a decoding step's GELU (batch x
    # 2048, from cpu_decode) is cheaper than the hand-off to the pool.
    parts = np.array_split(np.arange(len(rows)), _workers() if a.size >= MIN_GELU else 1)
    _run_parallel([lambda p=p: _gelu_rows(rows[p[0]:p[-1] + 1], cols[p[0]:p[-1] + 1])
                   for p in parts if len(p)])
    return out


@mx.custom_function
def _gelu(x: mx.array) -> mx.array:
    try:
        a = host(x)
    except _TRANSFORM_ERRORS:
        return _gelu_mlx(x)
    return mx.array(_gelu_numpy(a)).astype(x.dtype)


@_gelu.vjp
def _gelu_vjp(primals, cotangent, output):
    return mx.vjp(_gelu_mlx, [primals], [cotangent])[1][0]


def gelu(x: mx.array) -> mx.array:
    """``x * Φ(x)`` with the exact erf; numpy inside :func:`inference` on Linux CPU."""
    if _np_erf is not None and x.size >= MIN_GELU and active():
        return _gelu(x)
    return _gelu_mlx(x)


# ---- self-attention core ----------------------------------------------------------------

def attention_mlx(q: mx.array, k: mx.array, v: mx.array, n_head: int) -> mx.array:
    """softmax((q·s)(k·s)ᵀ)·v over heads, s = head_dim^-¼, on (batch, time, width)."""
    b, t_q, d = q.shape
    t_k = k.shape[1]
    scale = (d // n_head) ** -0.25
    qh = (q * scale).reshape(b, t_q, n_head, -1).transpose(0, 2, 1, 3)
    kh = (k * scale).reshape(b, t_k, n_head, -1).transpose(0, 2, 3, 1)
    vh = v.reshape(b, t_k, n_head, -1).transpose(0, 2, 1, 3)
    w = mx.softmax((qh @ kh).astype(mx.float32), axis=-1, precise=True).astype(q.dtype)
    return (w @ vh).transpose(0, 2, 1, 3).reshape(b, t_q, d)


def _split_heads(a: np.ndarray, n_head: int, scale: float) -> np.ndarray:
    t, d = a.shape
    out = np.empty((n_head, t, d // n_head), np.float32)
    np.multiply(a.reshape(t, n_head, -1).transpose(1, 0, 2), np.float32(scale), out=out)
    return out


def _attention_numpy(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head: int) -> np.ndarray:
    b, t_q, d = q.shape
    hd = d // n_head
    scale = hd ** -0.25
    out = np.empty((b, n_head, t_q, hd), np.float32)

    def head(qh: np.ndarray, kh: np.ndarray, vh: np.ndarray, o_head: np.ndarray) -> None:
        kt = kh.T
        for r in range(0, t_q, ROWS):
            w = qh[r:r + ROWS] @ kt
            w -= w.max(axis=-1, keepdims=True)
            np.exp(w, out=w)
            z = w.sum(axis=-1, keepdims=True)
            o = o_head[r:r + ROWS]
            np.matmul(w, vh, out=o)
            o /= z

    tasks = []
    for i in range(b):
        qh = _split_heads(q[i], n_head, scale)
        kh = _split_heads(k[i], n_head, scale)
        vh = _split_heads(v[i], n_head, 1.0)
        tasks += [lambda i=i, h=h, qh=qh, kh=kh, vh=vh: head(qh[h], kh[h], vh[h], out[i, h])
                  for h in range(n_head)]
    _run_parallel(tasks)
    return out.transpose(0, 2, 1, 3).reshape(b, t_q, d)


_attention_fns: dict[int, Callable] = {}


def _attention_fn(n_head: int) -> Callable:
    if n_head in _attention_fns:
        return _attention_fns[n_head]

    def reference(q, k, v):
        return attention_mlx(q, k, v, n_head)

    @mx.custom_function
    def fn(q, k, v):
        try:
            qn, kn, vn = host(q), host(k), host(v)
        except _TRANSFORM_ERRORS:
            return reference(q, k, v)
        return mx.array(_attention_numpy(qn, kn, vn, n_head)).astype(q.dtype)

    @fn.vjp
    def fn_vjp(primals, cotangent, output):
        return tuple(mx.vjp(reference, list(primals), [cotangent])[1])

    _attention_fns[n_head] = fn
    return fn


def self_attention(q: mx.array, k: mx.array, v: mx.array, n_head: int) -> mx.array:
    """Unmasked attention on (batch, time, width) projections; numpy inside
    :func:`inference` on Linux CPU, MLX otherwise."""
    if active():
        return _attention_fn(n_head)(q, k, v)
    return attention_mlx(q, k, v, n_head)


# ---- decoding: attention over head-split keys, and the vocabulary projection -----------

def _attend_heads_mlx(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    w = mx.softmax((q @ k.swapaxes(-1, -2)).astype(mx.float32), axis=-1, precise=True)
    return w.astype(q.dtype) @ v


@mx.custom_function
def _attend_heads(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    try:
        qn, kn, vn = host(q), host(k), host(v)
    except _TRANSFORM_ERRORS:
        return _attend_heads_mlx(q, k, v)
    w = qn @ kn.swapaxes(-1, -2)
    w -= w.max(axis=-1, keepdims=True)
    np.exp(w, out=w)
    w /= w.sum(axis=-1, keepdims=True)
    return mx.array(w @ vn).astype(q.dtype)


@_attend_heads.vjp
def _attend_heads_vjp(primals, cotangent, output):
    return tuple(mx.vjp(_attend_heads_mlx, list(primals), [cotangent])[1])


def attend_heads(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """softmax(q·kᵀ)·v on head-split (batch, heads, time, head_dim) arrays, already
    scaled and unmasked (decoding steps and cross-attention). numpy only for float32
    keys: converting half-precision keys every step would cost more than it saves."""
    if k.size >= MIN_ATTEND and k.dtype == mx.float32 and active():
        return _attend_heads(q, k, v)
    return _attend_heads_mlx(q, k, v)


def _matmul_t_mlx(x: mx.array, w: mx.array) -> mx.array:
    return x @ w.T


@mx.custom_function
def _matmul_t(x: mx.array, w: mx.array) -> mx.array:
    try:
        xn, wn = host(x), host(w)
    except _TRANSFORM_ERRORS:
        return _matmul_t_mlx(x, w)
    lead = xn.shape[:-1]
    out = xn.reshape(-1, xn.shape[-1]) @ wn.T  # a single GEMV/GEMM over all rows
    return mx.array(out.reshape(*lead, wn.shape[0]))


@_matmul_t.vjp
def _matmul_t_vjp(primals, cotangent, output):
    return tuple(mx.vjp(_matmul_t_mlx, list(primals), [cotangent])[1])


def matmul_t(x: mx.array, w: mx.array) -> mx.array:
    """``x @ w.T`` for float32 weights; numpy's GEMV inside :func:`inference` (MLX's CPU
    matmul streams a 51865 x 512 matrix at a third of numpy's speed for one row)."""
    if active() and w.dtype == mx.float32 and x.dtype == mx.float32:
        return _matmul_t(x, w)
    return _matmul_t_mlx(x, w)
