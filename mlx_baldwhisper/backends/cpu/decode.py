"""Incremental decoding in numpy, for float32 decoders on Linux CPU.

A decoding step is a chain of small products: one to ten rows against 512 x 512 and
512 x 2048 weights, and against the 51865 x 512 vocabulary. MLX's CPU matmul runs
these as general GEMMs (4-5x slower than a GEMV for one row) and every MLX op is a
hand-off to its worker thread, so the step is computed here with numpy's BLAS on
zero-copy views of the model's own MLX weights, taken once per decoding run. The
encoder keys/values are still produced by MLX (one large GEMM per window); the
self-attention history lives in numpy buffers in the cache's head-split layout
(kv_cache.py). Quantized or half-precision decoders decode in MLX (backends/mlx.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...kv_cache import grown, merge_heads, split_heads
from ...lowrank import LowRankEmbedding
from ..mlx import causal_mask
from . import ops
from .ops import host

Linear = tuple[np.ndarray, Optional[np.ndarray]]  # (weightᵀ, bias)
Norm = tuple[Optional[np.ndarray], Optional[np.ndarray], np.float32]  # (weight, bias, eps)


def _linear_of(lin: nn.Linear) -> Linear:
    return host(lin.weight).T, host(lin.bias) if "bias" in lin else None


def _norm_of(ln: nn.LayerNorm) -> Norm:
    return (host(ln.weight) if "weight" in ln else None, host(ln.bias) if "bias" in ln else None,
            np.float32(ln.eps))


def _linear(x: np.ndarray, p: Linear) -> np.ndarray:
    b, t, d = x.shape
    y = x.reshape(b * t, d) @ p[0]
    if p[1] is not None:
        y += p[1]
    return y.reshape(b, t, -1)


def _layer_norm(x: np.ndarray, p: Norm) -> np.ndarray:
    y = x - x.mean(axis=-1, keepdims=True)
    y *= 1.0 / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + p[2])
    if p[0] is not None:
        y *= p[0]
    if p[1] is not None:
        y += p[1]
    return y


class _Block(NamedTuple):
    """One decoder block's weights as numpy views."""

    n_head: int
    scale: float
    attn_ln: Norm
    query: Linear
    key: Linear
    value: Linear
    out: Linear
    cross_ln: Norm
    cross_query: Linear
    cross_out: Linear
    mlp_ln: Norm
    mlp1: Linear
    mlp2: Linear

    @classmethod
    def of(cls, blk: Any) -> "_Block":
        a, c = blk.attn, blk.cross_attn
        return cls(a.n_head, a.scale, _norm_of(blk.attn_ln), _linear_of(a.query),
                   _linear_of(a.key), _linear_of(a.value), _linear_of(a.out),
                   _norm_of(blk.cross_attn_ln), _linear_of(c.query), _linear_of(c.out),
                   _norm_of(blk.mlp_ln), _linear_of(blk.mlp1), _linear_of(blk.mlp2))

    def __call__(self, x: np.ndarray, kv: np.ndarray, start: int, mask: Optional[np.ndarray],
                 cross: tuple[np.ndarray, np.ndarray],
                 audio_padding: Optional[np.ndarray] = None) -> np.ndarray:
        """``kv``: this layer's (2, batch, heads, capacity, head_dim) history buffer; the new
        keys/values go in at ``start``. ``audio_padding``: (batch, positions), True for
        padded encoder positions."""
        end = start + x.shape[1]
        y = _layer_norm(x, self.attn_ln)
        q = split_heads(_linear(y, self.query), self.n_head, self.scale)
        kv[0, :, :, start:end] = split_heads(_linear(y, self.key), self.n_head, self.scale)
        kv[1, :, :, start:end] = split_heads(_linear(y, self.value), self.n_head)
        o = ops.attention(q, kv[0, :, :, :end], kv[1, :, :, :end], mask)
        x = x + _linear(merge_heads(o), self.out)
        y = _layer_norm(x, self.cross_ln)
        q = split_heads(_linear(y, self.cross_query), self.n_head, self.scale)
        x = x + _linear(merge_heads(ops.attention(q, *cross, None, audio_padding)), self.cross_out)
        y = _layer_norm(x, self.mlp_ln)
        return x + _linear(ops.gelu(_linear(y, self.mlp1)), self.mlp2)


class NumpyInference:
    """Decoding state and step in numpy; the interface of ``backends.mlx.MLXInference``.
    ``decoder`` is the model's :class:`~mlx_baldwhisper.model.TextDecoder`."""

    @staticmethod
    def supports(decoder: Any) -> bool:
        """Float32, unquantized weights (and scipy for GELU)."""
        if ops.np_erf is None:
            return False
        emb = decoder.token_embedding
        if isinstance(emb, LowRankEmbedding):
            table = (type(emb.A) is nn.Embedding and emb.A.weight.dtype == emb.B.dtype == mx.float32
                     and ("exact" not in emb or emb.exact.dtype == mx.float32))
        else:
            table = type(emb) is nn.Embedding and emb.weight.dtype == mx.float32
        return table and all(
            type(lin) is nn.Linear and lin.weight.dtype == mx.float32
            for blk in decoder.blocks
            for lin in (blk.attn.query, blk.attn.key, blk.attn.value, blk.attn.out,
                        blk.cross_attn.query, blk.cross_attn.out, blk.mlp1, blk.mlp2))

    def __init__(self, decoder: Any, batch: int, audio_padding: Optional[mx.array] = None):
        self.decoder, self.batch = decoder, batch
        self.audio_padding = None if audio_padding is None else np.array(audio_padding)
        self.blocks = [_Block.of(blk) for blk in decoder.blocks]
        emb = decoder.token_embedding
        low_rank = isinstance(emb, LowRankEmbedding)
        self.embedding = host(emb.A.weight if low_rank else emb.weight)  # (vocab, rank or width)
        self.factor = host(emb.B) if low_rank else None  # (rank, width)
        # rows kept whole past the factored ones (lowrank.py), or None
        self.exact = host(emb.exact) if low_rank and "exact" in emb else None
        self.positions = host(decoder.positional_embedding)
        self.ln = _norm_of(decoder.ln)
        self.kv: Optional[np.ndarray] = None  # (layers, 2, batch, heads, capacity, head_dim)
        self.cross: Optional[list[tuple[np.ndarray, np.ndarray]]] = None
        self.offset = 0

    def _reserve(self, end: int) -> np.ndarray:
        """The history buffer, grown (like KVCache's) so ``end`` positions fit."""
        if self.kv is None or end > self.kv.shape[4]:
            blk = self.blocks[0]
            width = blk.key[0].shape[1]
            size = grown(end, self.positions.shape[0])
            kv = np.zeros((len(self.blocks), 2, self.batch, blk.n_head, size, width // blk.n_head),
                          np.float32)
            if self.kv is not None:
                kv[..., :self.offset, :] = self.kv[..., :self.offset, :]
            self.kv = kv
        return self.kv

    def logits(self, tokens: mx.array, audio_features: mx.array) -> mx.array:
        """Logits ``(batch, t, vocab)`` for ``tokens``, the sequences' next ``t`` tokens."""
        if self.cross is None:
            cross = [blk.cross_attn.cross_kv_of(audio_features) for blk in self.decoder.blocks]
            mx.eval(cross)
            self.cross = [(host(k), host(v)) for k, v in cross]
        toks = np.asarray(memoryview(tokens))
        b, t = toks.shape
        start = self.offset
        if self.exact is None:
            x = self.embedding[toks]
            if self.factor is not None:
                x = x @ self.factor
        else:
            split = self.embedding.shape[0]
            x = np.where((toks >= split)[..., None], self.exact[np.maximum(toks - split, 0)],
                         self.embedding[np.minimum(toks, split - 1)] @ self.factor)
        x = x + self.positions[start:start + t]
        mask = None
        if t > 1:  # the prompt: causal within the new tokens
            mask = np.asarray(memoryview(causal_mask(t, start, mx.float32)))
        kv = self._reserve(start + t)
        for blk, kv_layer, cross in zip(self.blocks, kv, self.cross):
            x = blk(x, kv_layer, start, mask, cross, self.audio_padding)
        self.offset = start + t
        flat = _layer_norm(x, self.ln).reshape(b * t, -1)
        logits = (flat @ self.factor.T if self.factor is not None else flat) @ self.embedding.T
        if self.exact is not None:
            logits = np.concatenate([logits, flat @ self.exact.T], axis=-1)
        return mx.array(logits.reshape(b, t, -1))

    def reorder(self, index: np.ndarray) -> None:
        """Beam search: keep the histories of the surviving hypotheses."""
        if self.kv is not None:
            self.kv = self.kv[:, :, index]
