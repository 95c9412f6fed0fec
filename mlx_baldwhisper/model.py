"""The Whisper encoder-decoder in MLX.

Parameter names follow openai/whisper (``encoder.blocks.0.attn.query`` ...) so that
checkpoints from every source map onto one layout. Two BaldWhisper changes are
expressed through the config alone: a decoder with fewer (merged) layers, and a
low-rank tied embedding (``embedding_rank``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from . import _blas, cpu_decode, cpu_ops
from .dims import ModelDimensions
from .kv_cache import KVCache
from .lowrank import LowRankEmbedding


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> mx.array:
    """Whisper's fixed encoder positions: [sin | cos] over geometric timescales."""
    half = channels // 2
    step = math.log(max_timescale) / (half - 1)
    inv = mx.exp(-step * mx.arange(half, dtype=mx.float32))
    t = mx.arange(length, dtype=mx.float32)[:, None] * inv[None, :]
    return mx.concatenate([mx.sin(t), mx.cos(t)], axis=1)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def __call__(
        self,
        x: mx.array,
        xa: Optional[mx.array] = None,
        mask: Optional[mx.array] = None,
        cache: Optional[KVCache] = None,
        cross_kv: Optional[tuple[mx.array, mx.array]] = None,
        need_weights: bool = False,
    ) -> tuple[mx.array, Optional[tuple[mx.array, mx.array]], Optional[mx.array]]:
        """Returns (output, cross-attention (k, v) for reuse, attention weights or None).

        The cross (k, v) pair is kept in the layout attention uses: split by head,
        ``(batch, heads, audio_ctx, head_dim)``, contiguous, keys already scaled, so a
        decoding step reads it as it is (no per-step scale, transpose or copy).
        """
        q = self.query(x)
        if cross_kv is not None:
            k, v = cross_kv
        elif xa is not None:
            cross_kv = k, v = self.cross_kv_of(xa)
        elif cache is None and mask is None and not need_weights and cpu_ops.active():
            out = cpu_ops.self_attention(q, self.key(x), self.value(x), self.n_head)
            return self.out(out), None, None
        else:
            k = self._heads(self.key(x), self._scale(x))
            v = self._heads(self.value(x))
            if cache is not None:
                k, v = cache.update_heads(k, v)
        if cross_kv is not None and not need_weights:
            b, t_q, d = q.shape
            q = self._heads(q, self._scale(q))
            out = cpu_ops.attend_heads(q, k, v).transpose(0, 2, 1, 3).reshape(b, t_q, d)
            return self.out(out), cross_kv, None
        out, w = self.attend(q, k, v, mask, need_weights)
        return self.out(out), cross_kv, w

    def cross_kv_of(self, xa: mx.array) -> tuple[mx.array, mx.array]:
        """Encoder keys (scaled) and values, head-split and contiguous, for reuse."""
        k = mx.contiguous(self._heads(self.key(xa), self._scale(xa)))
        v = mx.contiguous(self._heads(self.value(xa)))
        return k, v

    def _scale(self, x: mx.array) -> float:
        return (x.shape[-1] // self.n_head) ** -0.25

    def _heads(self, x: mx.array, scale: Optional[float] = None) -> mx.array:
        """(batch, time, width) -> (batch, heads, time, head_dim), optionally scaled."""
        b, t, _ = x.shape
        if scale is not None:
            x = x * scale
        return x.reshape(b, t, self.n_head, -1).transpose(0, 2, 1, 3)

    def attend(
        self, q: mx.array, k: mx.array, v: mx.array, mask: Optional[mx.array], need_weights: bool
    ) -> tuple[mx.array, Optional[mx.array]]:
        """q: (batch, t_q, width); k, v: head-split (batch, heads, t_k, head_dim), k scaled."""
        b, t_q, d = q.shape
        q = self._heads(q, self._scale(q))
        qk = q @ k.swapaxes(-1, -2)
        if mask is not None:
            qk = qk + mask
        w = mx.softmax(qk.astype(mx.float32), axis=-1, precise=True).astype(q.dtype)
        out = (w @ v).transpose(0, 2, 1, 3).reshape(b, t_q, d)
        return out, (qk if need_weights else None)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = nn.LayerNorm(n_state) if cross_attention else None
        self.mlp1 = nn.Linear(n_state, 4 * n_state)
        self.mlp2 = nn.Linear(4 * n_state, n_state)
        self.mlp_ln = nn.LayerNorm(n_state)

    def __call__(
        self,
        x: mx.array,
        xa: Optional[mx.array] = None,
        mask: Optional[mx.array] = None,
        cache: Optional[KVCache] = None,
        cross_kv: Optional[tuple[mx.array, mx.array]] = None,
        need_weights: bool = False,
    ) -> tuple[mx.array, Optional[tuple[mx.array, mx.array]], Optional[mx.array]]:
        y, _, _ = self.attn(self.attn_ln(x), mask=mask, cache=cache)
        x = x + y
        w = None
        if self.cross_attn is not None:
            y, cross_kv, w = self.cross_attn(
                self.cross_attn_ln(x), xa, cross_kv=cross_kv, need_weights=need_weights
            )
            x = x + y
        x = x + self.mlp2(cpu_ops.gelu(self.mlp1(self.mlp_ln(x))))
        return x, cross_kv, w


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self._positional_embedding = sinusoids(n_ctx, n_state)
        self.blocks = [ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)]
        self.ln_post = nn.LayerNorm(n_state)

    def __call__(self, mel: mx.array) -> mx.array:
        """mel: (batch, frames, n_mels) -> (batch, frames // 2, n_state)."""
        x = cpu_ops.gelu(self.conv1(mel))
        x = cpu_ops.gelu(self.conv2(x))
        n = x.shape[1]
        if n > self._positional_embedding.shape[0]:
            raise ValueError(f"audio is {n} frames, the encoder holds at most "
                             f"{self._positional_embedding.shape[0]}")
        x = x + self._positional_embedding[:n].astype(x.dtype)
        for block in self.blocks:
            x, _, _ = block(x)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, dims: ModelDimensions):
        super().__init__()
        n_state = dims.n_text_state
        if dims.embedding_rank:
            self.token_embedding = LowRankEmbedding(dims.n_vocab, n_state, dims.embedding_rank)
        else:
            self.token_embedding = nn.Embedding(dims.n_vocab, n_state)
        self.positional_embedding = mx.zeros((dims.n_text_ctx, n_state))
        self.blocks = [
            ResidualAttentionBlock(n_state, dims.n_text_head, cross_attention=True)
            for _ in range(dims.n_text_layer)
        ]
        self.ln = nn.LayerNorm(n_state)

    def __call__(
        self,
        tokens: mx.array,
        xa: mx.array,
        caches: Optional[list[KVCache]] = None,
        cross_kv: Optional[list] = None,
        need_weights: bool = False,
        return_hidden: bool = False,
    ) -> tuple[mx.array, list, list]:
        """Returns (logits, per-layer cross (k, v), per-layer cross-attention weights).

        ``caches`` holds the self-attention keys/values already seen, so a step only
        feeds the new tokens; ``cross_kv`` holds the encoder projections computed once
        per audio window. Incremental decoding (``caches`` given) is inference: on
        Linux CPU a float32 decoder's step runs in numpy (cpu_decode), other decoders
        use numpy for cross-attention and the vocabulary projection (cpu_ops).
        """
        if caches is not None:
            with cpu_ops.inference():
                if cpu_ops.active() and not (need_weights or return_hidden) \
                        and cpu_decode.supported(self):
                    out = cpu_decode.decode_step(self, tokens, xa, caches, cross_kv)
                    if out is not None:
                        return out
                return self._forward(tokens, xa, caches, cross_kv, need_weights, return_hidden)
        return self._forward(tokens, xa, caches, cross_kv, need_weights, return_hidden)

    def _forward(self, tokens, xa, caches, cross_kv, need_weights, return_hidden):
        offset = caches[0].offset if caches else 0
        t = tokens.shape[-1]
        x = self.token_embedding(tokens) + self.positional_embedding[offset : offset + t]
        mask = None
        if t > 1:
            mask = causal_mask(t, offset, x.dtype)
        cross_kv = cross_kv or [None] * len(self.blocks)
        new_cross, weights = [], []
        for i, block in enumerate(self.blocks):
            x, ckv, w = block(
                x, xa, mask=mask, cache=caches[i] if caches else None,
                cross_kv=cross_kv[i], need_weights=need_weights,
            )
            new_cross.append(ckv)
            weights.append(w)
        x = self.ln(x)
        if return_hidden:
            return x, new_cross, weights
        return self.project(x), new_cross, weights

    def project(self, x: mx.array) -> mx.array:
        """Hidden states to vocabulary logits with the tied (possibly factored) embedding."""
        emb = self.token_embedding
        if cpu_ops.active():
            if isinstance(emb, LowRankEmbedding) and type(emb.A) is nn.Embedding:
                return cpu_ops.matmul_t(x @ emb.B.T, emb.A.weight)
            if type(emb) is nn.Embedding:
                return cpu_ops.matmul_t(x, emb.weight)
        return emb.as_linear(x)


def causal_mask(t: int, offset: int, dtype: mx.Dtype) -> mx.array:
    rows = mx.arange(offset, offset + t)[:, None]
    cols = mx.arange(offset + t)[None, :]
    return mx.where(cols > rows, mx.array(-1e9, dtype=dtype), mx.array(0, dtype=dtype))


class Whisper(nn.Module):
    # Plain attributes, not parameters: nn.Module would treat a list or dict as a child.
    _META = ("alignment_heads", "extra_config", "source", "tokenizer_dir")

    def __setattr__(self, key: str, val: Any) -> None:
        if key in self._META:
            object.__setattr__(self, key, val)
        else:
            super().__setattr__(key, val)

    def __init__(self, dims: ModelDimensions, alignment_heads: Optional[list] = None):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(
            dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
            dims.n_audio_layer,
        )
        self.decoder = TextDecoder(dims)
        if alignment_heads is None:  # openai default: all heads of the upper half
            half = dims.n_text_layer // 2
            alignment_heads = [
                [l, h] for l in range(half, dims.n_text_layer) for h in range(dims.n_text_head)
            ]
        self.alignment_heads = [list(map(int, p)) for p in alignment_heads]
        self.extra_config: dict[str, Any] = {}
        self.source = "random"
        self.tokenizer_dir = None

    def embed_audio(self, mel: mx.array) -> mx.array:
        """Encoder output for inference: on Linux CPU the softmax and GELU run in numpy
        (see cpu_ops; gradients through it remain exact) and its GEMMs use several BLAS
        threads (``_blas.threads``), evaluated before the decoder's single-threaded steps."""
        with cpu_ops.inference(), _blas.threads(_blas.encoder_threads()):
            out = self.encoder(mel)
            try:
                mx.eval(out)
            except cpu_ops._TRANSFORM_ERRORS:  # inside mx.compile/vmap: stays lazy
                pass
        return out

    def logits(self, tokens: mx.array, audio_features: mx.array) -> mx.array:
        return self.decoder(tokens, audio_features)[0]

    def __call__(self, mel: mx.array, tokens: mx.array) -> mx.array:
        return self.decoder(tokens, self.encoder(mel))[0]

    def new_caches(self, batch: int) -> list[KVCache]:
        d = self.dims
        return [KVCache(batch, d.n_text_ctx, d.n_text_state, d.n_text_head)
                for _ in range(d.n_text_layer)]

    @property
    def is_multilingual(self) -> bool:
        return self.dims.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        return self.dims.n_vocab - 51765 - int(self.is_multilingual)

    @property
    def dtype(self) -> mx.Dtype:
        return self.encoder.conv1.weight.dtype
