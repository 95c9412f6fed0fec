"""One incremental decoder step in numpy, for float32 models on Linux CPU.

A decoding step is a chain of small products: one to ten rows against 512 x 512 and
512 x 2048 weights, and against the 51865 x 512 vocabulary. MLX's CPU matmul runs
these as general GEMMs (4-5x slower than a GEMV for one row) and every MLX op is a
hand-off to its worker thread, so the step is computed here with numpy's BLAS on
zero-copy views of the model's own MLX weights. The cross-attention keys/values are
still produced by MLX (one large GEMM per window) and handed back as MLX arrays, so
callers see the same ``decoder(...)`` results; the self-attention cache keeps numpy
buffers (see :class:`~mlx_baldwhisper.kv_cache.KVCache`).

Only used for incremental decoding (``caches`` given), which is never differentiated;
quantized or half-precision decoders, other devices, and
``MLX_BALDWHISPER_CPU_OPS=mlx`` use the MLX path.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cpu_ops
from .cpu_ops import host
from .lowrank import LowRankEmbedding

_F32 = mx.float32


def supported(decoder: Any) -> bool:
    """Float32, unquantized weights (and scipy for GELU): the numpy step applies."""
    if cpu_ops._np_erf is None:
        return False
    emb = decoder.token_embedding
    if isinstance(emb, LowRankEmbedding):
        if type(emb.A) is not nn.Embedding or emb.B.dtype != _F32 or emb.A.weight.dtype != _F32:
            return False
    elif type(emb) is not nn.Embedding or emb.weight.dtype != _F32:
        return False
    for blk in decoder.blocks:
        for lin in (blk.attn.query, blk.attn.key, blk.attn.value, blk.attn.out,
                    blk.cross_attn.query, blk.cross_attn.out, blk.mlp1, blk.mlp2):
            if type(lin) is not nn.Linear or lin.weight.dtype != _F32:
                return False
    return True


def _layer_norm(x: np.ndarray, ln: nn.LayerNorm) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    y = x - mean
    var = np.mean(y * y, axis=-1, keepdims=True)
    y *= 1.0 / np.sqrt(var + np.float32(ln.eps))
    if "weight" in ln:
        y *= host(ln.weight)
    if "bias" in ln:
        y += host(ln.bias)
    return y


def _linear(x: np.ndarray, lin: nn.Linear) -> np.ndarray:
    b, t, d = x.shape
    y = x.reshape(b * t, d) @ host(lin.weight).T
    if "bias" in lin:
        y += host(lin.bias)
    return y.reshape(b, t, -1)


def _heads(x: np.ndarray, n_head: int, scale: Optional[float] = None) -> np.ndarray:
    b, t, d = x.shape
    h = x.reshape(b, t, n_head, d // n_head).transpose(0, 2, 1, 3)
    return h * np.float32(scale) if scale is not None else h


def _softmax_(w: np.ndarray) -> np.ndarray:
    w -= w.max(axis=-1, keepdims=True)
    np.exp(w, out=w)
    w /= w.sum(axis=-1, keepdims=True)
    return w


def _merge(o: np.ndarray) -> np.ndarray:
    b, h, t, d = o.shape
    return o.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def _gelu(x: np.ndarray) -> np.ndarray:
    return cpu_ops._gelu_numpy(x)


def decode_step(decoder: Any, tokens: mx.array, xa: mx.array, caches: list,
                cross_kv: Optional[list]) -> Optional[tuple[mx.array, list, list]]:
    """``decoder(tokens, xa, caches, cross_kv)`` computed in numpy; None if the inputs
    cannot be read (inside mx.compile/vmap), in which case nothing was changed."""
    blocks = decoder.blocks
    if not cross_kv or any(c is None for c in cross_kv):
        cross_kv = [blk.cross_attn.cross_kv_of(xa) for blk in blocks]
    try:
        mx.eval(tokens, cross_kv)
        toks = np.asarray(memoryview(tokens)).astype(np.int64)
        cross = [(host(k), host(v)) for k, v in cross_kv]
    except cpu_ops._TRANSFORM_ERRORS:
        return None
    offset = caches[0].offset
    b, t = toks.shape
    emb = decoder.token_embedding
    if isinstance(emb, LowRankEmbedding):
        x = host(emb.A.weight)[toks] @ host(emb.B)
    else:
        x = host(emb.weight)[toks]
    x = x + host(decoder.positional_embedding)[offset:offset + t]
    mask = None
    if t > 1:  # the prompt: causal within the new tokens
        rows = np.arange(offset, offset + t)[:, None]
        cols = np.arange(offset + t)[None, :]
        mask = np.where(cols > rows, np.float32(-1e9), np.float32(0))
    for blk, cache, (ck, cv) in zip(blocks, caches, cross):
        att = blk.attn
        h = att.n_head
        scale = (x.shape[-1] // h) ** -0.25
        y = _layer_norm(x, blk.attn_ln)
        q = _heads(_linear(y, att.query), h, scale)
        k = _heads(_linear(y, att.key), h, scale)
        v = _heads(_linear(y, att.value), h)
        k, v = cache.update_numpy(k, v)
        w = q @ k.swapaxes(-1, -2)
        if mask is not None:
            w += mask
        x = x + _linear(_merge(_softmax_(w) @ v), att.out)
        ca = blk.cross_attn
        y = _layer_norm(x, blk.cross_attn_ln)
        q = _heads(_linear(y, ca.query), h, scale)
        w = q @ ck.swapaxes(-1, -2)
        x = x + _linear(_merge(_softmax_(w) @ cv), ca.out)
        y = _layer_norm(x, blk.mlp_ln)
        x = x + _linear(_gelu(_linear(y, blk.mlp1)), blk.mlp2)
    x = _layer_norm(x, decoder.ln)
    flat = x.reshape(b * t, -1)
    if isinstance(emb, LowRankEmbedding):
        logits = (flat @ host(emb.B).T) @ host(emb.A.weight).T
    else:
        logits = flat @ host(emb.weight).T
    return mx.array(logits.reshape(b, t, -1)), list(cross_kv), [None] * len(blocks)

