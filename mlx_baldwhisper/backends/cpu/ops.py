"""numpy kernels for MLX's CPU backend on Linux, and the MLX kernels built on them.

MLX's CPU element-wise kernels are scalar on Linux/x86 (``exp`` ~11 ns and ``erf``
~24 ns per element), so the encoder spends most of its time in the self-attention
softmax (8 x 1500 x 1500 per layer) and in GELU. numpy's ``exp`` is vectorised
(~0.4 ns per element) and numpy's matmul uses its own OpenBLAS, so these two pieces are
computed here, head by head and in blocks of query rows that stay in cache (heads, and
GELU rows, spread over a small thread pool sized like the encoder's BLAS threads), and
handed back to MLX through :data:`KERNELS`. Projections, layer norms and everything else
stay in MLX (quantized layers included).

The MLX kernels are ``mx.custom_function``s whose backward pass is the plain MLX
computation, so gradients stay exact if one is ever taken through them; inside
``mx.compile``/``mx.vmap`` (where arrays cannot be read) they fall back to MLX.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ... import _blas
from ..mlx import NEG_INF, Kernels
from ..mlx import attention as mlx_attention

ROWS = 256  # query rows per softmax block: 256 x 1500 floats = 1.5 MB, stays in L2
# Below these sizes a numpy kernel does not pay for the host round trip (one MLX
# evaluation and thread hand-off each): GELU of a decoding step (batch x 2048), the
# cross-attention of one item (8 x 1500 x 64 keys) stay in MLX.
MIN_GELU = 1 << 17
MIN_ATTEND = 1 << 20
TRANSFORM_ERRORS = (RuntimeError, ValueError)  # reading an array inside mx.compile/vmap

try:  # scipy ships with librosa; without it GELU stays in MLX
    from scipy.special import erf as np_erf
except ImportError:  # pragma: no cover
    np_erf = None


def host(x: mx.array) -> np.ndarray:
    """A zero-copy float32 numpy view of ``x`` (evaluates it). Raises inside a transform."""
    if x.dtype != mx.float32:
        x = x.astype(mx.float32)
    return np.asarray(memoryview(x))


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Along the last axis; a row whose maximum is -inf is not shifted (it stays -inf/nan)."""
    m = x.max(axis=-1, keepdims=True)
    y = x - np.where(np.isfinite(m), m, 0)
    y -= np.log(np.exp(y).sum(axis=-1, keepdims=True))
    return y


# ---- a small thread pool for the encoder's kernels --------------------------------------

_pool = None


def _workers() -> int:
    """Threads for the big numpy kernels (encoder attention and GELU): as many as the
    encoder's BLAS threads. numpy releases the GIL in its loops and BLAS calls; each
    thread's numpy BLAS stays single-threaded (see ``backends.cpu.inference``)."""
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

def _gelu_rows(a: np.ndarray, out: np.ndarray) -> None:
    np.divide(a, np.float32(math.sqrt(2)), out=out)
    np_erf(out, out=out)
    out += 1
    out *= a
    out *= np.float32(0.5)


def gelu(a: np.ndarray) -> np.ndarray:
    """``a * Φ(a)``; rows split across the pool only when large (the encoder): a decoding
    step's GELU (batch x 2048) is cheaper than the hand-off to the pool."""
    out = np.empty_like(a)
    rows, cols = a.reshape(-1, a.shape[-1]), out.reshape(-1, a.shape[-1])
    parts = np.array_split(np.arange(len(rows)), _workers() if a.size >= MIN_GELU else 1)
    _run_parallel([lambda p=p: _gelu_rows(rows[p[0]:p[-1] + 1], cols[p[0]:p[-1] + 1])
                   for p in parts if len(p)])
    return out


@mx.custom_function
def _gelu_fn(x: mx.array) -> mx.array:
    try:
        a = host(x)
    except TRANSFORM_ERRORS:
        return nn.gelu(x)
    return mx.array(gelu(a)).astype(x.dtype)


@_gelu_fn.vjp
def _gelu_vjp(primals, cotangent, output):
    return mx.vjp(nn.gelu, [primals], [cotangent])[1][0]


def _gelu_kernel(x: mx.array) -> mx.array:
    if np_erf is not None and x.size >= MIN_GELU:
        return _gelu_fn(x)
    return nn.gelu(x)


# ---- attention ---------------------------------------------------------------------------

def _softmax_product(q: np.ndarray, kt: np.ndarray, v: np.ndarray, bias: Optional[np.ndarray],
                     out: np.ndarray) -> None:
    """out = softmax(q·kt + bias)·v, ROWS query rows (axis -2) at a time, normalised after
    the product with v (t_q x head_dim divisions instead of t_q x t_k)."""
    for r in range(0, q.shape[-2], ROWS):
        w = q[..., r:r + ROWS, :] @ kt
        if bias is not None:
            w += bias if bias.shape[-2] == 1 else bias[..., r:r + ROWS, :]
        w -= w.max(axis=-1, keepdims=True)
        np.exp(w, out=w)
        z = w.sum(axis=-1, keepdims=True)
        o = out[..., r:r + ROWS, :]
        np.matmul(w, v, out=o)
        o /= z


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Optional[np.ndarray] = None,
              key_padding_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """The numpy twin of ``backends.mlx.attention`` (same arguments, float32 numpy arrays;
    returns the output only). Up to ROWS query rows run as one batched product (a decoding
    step); more (the encoder) run head by head on the thread pool."""
    b, h, t_q, _ = q.shape
    bias = None if mask is None else mask[None, None]
    if key_padding_mask is not None:
        pad = np.where(key_padding_mask, np.float32(NEG_INF), np.float32(0))[:, None, None, :]
        bias = pad if bias is None else pad + bias
    out = np.empty((b, h, t_q, v.shape[-1]), np.float32)
    if t_q <= ROWS:
        _softmax_product(q, k.swapaxes(-1, -2), v, bias, out)
        return out
    _run_parallel([
        lambda i=i, j=j: _softmax_product(
            q[i, j], k[i, j].T, v[i, j], None if bias is None else bias[min(i, len(bias) - 1), 0],
            out[i, j])
        for i in range(b) for j in range(h)])
    return out


@mx.custom_function
def _attention_fn(q: mx.array, k: mx.array, v: mx.array,
                  key_padding_mask: Optional[mx.array]) -> mx.array:
    try:
        qn, kn, vn = host(q), host(k), host(v)
        pad = None if key_padding_mask is None else np.asarray(memoryview(key_padding_mask))
    except TRANSFORM_ERRORS:
        return mlx_attention(q, k, v, None, key_padding_mask)[0]
    return mx.array(attention(qn, kn, vn, None, pad)).astype(q.dtype)


@_attention_fn.vjp
def _attention_vjp(primals, cotangent, output):
    q, k, v, pad = primals
    grads = mx.vjp(lambda q, k, v: mlx_attention(q, k, v, None, pad)[0], [q, k, v], [cotangent])[1]
    return (*grads, None if pad is None else mx.zeros_like(pad))


def _attention_kernel(q: mx.array, k: mx.array, v: mx.array, mask: Optional[mx.array] = None,
                      key_padding_mask: Optional[mx.array] = None
                      ) -> tuple[mx.array, Optional[mx.array]]:
    """numpy for unmasked attention where it pays: the encoder's (many query rows share
    one conversion, so any dtype), and float32 keys of at least MIN_ATTEND values
    (cross-attention; converting half-precision keys every step would cost more than it
    saves). Returns no scores from numpy."""
    if mask is None and (q.shape[2] > ROWS or (k.dtype == mx.float32 and k.size >= MIN_ATTEND)):
        return _attention_fn(q, k, v, key_padding_mask), None
    return mlx_attention(q, k, v, mask, key_padding_mask)


KERNELS = Kernels(_attention_kernel, _gelu_kernel)
