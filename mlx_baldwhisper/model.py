"""The Whisper encoder-decoder in plain MLX.

Parameter names follow openai/whisper (``encoder.blocks.0.attn.query`` ...) so that
checkpoints from every source map onto one layout. Two BaldWhisper changes are
expressed through the config alone: a decoder with fewer (merged) layers, and a
low-rank tied embedding (``embedding_rank``).

Attention and GELU are called through the kernel hook of backends/mlx.py (which
defines attention, below this module), so a backend can serve inference faster with
the same math; :meth:`Whisper.embed_audio` goes through that seam (``backends.encode``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from . import backends
from .backends.mlx import attention, causal_mask, kernels
from .dims import ModelDimensions
from .kv_cache import KVCache, merge_heads, split_heads
from .lowrank import LowRankEmbedding


def padding_mask(lengths: mx.array, n: int) -> mx.array:
    """(batch, n) True where a position is past its window's length."""
    return mx.arange(n)[None, :] >= lengths[:, None]


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
        self.scale = (n_state // n_head) ** -0.25  # on q and k each: (q·kᵀ)/√head_dim
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
        key_padding_mask: Optional[mx.array] = None,
    ) -> tuple[mx.array, Optional[tuple[mx.array, mx.array]], Optional[mx.array]]:
        """Returns (output, cross-attention (k, v) for reuse, attention scores or None).

        The cross (k, v) pair is kept in the layout attention uses (:meth:`cross_kv_of`),
        so a decoding step reads it as it is (no per-step scale, transpose or copy).
        ``key_padding_mask`` (batch, keys): True for keys that are padding (audio windows
        of different lengths in one batch).
        """
        q = split_heads(self.query(x), self.n_head, self.scale)
        if cross_kv is None and xa is not None:
            cross_kv = self.cross_kv_of(xa)
        if cross_kv is not None:
            k, v = cross_kv
        else:
            k = split_heads(self.key(x), self.n_head, self.scale)
            v = split_heads(self.value(x), self.n_head)
            if cache is not None:
                k, v = cache.update_heads(k, v)
        out, qk = (attention if need_weights else kernels().attention)(q, k, v, mask,
                                                                        key_padding_mask)
        return self.out(merge_heads(out)), cross_kv, qk if need_weights else None

    def cross_kv_of(self, xa: mx.array) -> tuple[mx.array, mx.array]:
        """Encoder keys (scaled) and values, head-split and contiguous, for reuse."""
        k = mx.contiguous(split_heads(self.key(xa), self.n_head, self.scale))
        v = mx.contiguous(split_heads(self.value(xa), self.n_head))
        return k, v


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
        self_padding: Optional[mx.array] = None,
        audio_padding: Optional[mx.array] = None,
    ) -> tuple[mx.array, Optional[tuple[mx.array, mx.array]], Optional[mx.array]]:
        """``self_padding`` masks padded keys of self-attention (the encoder's windows of
        different lengths), ``audio_padding`` those of cross-attention (the same windows,
        seen by the decoder)."""
        x = x + self.attn(self.attn_ln(x), mask=mask, cache=cache, key_padding_mask=self_padding)[0]
        w = None
        if self.cross_attn is not None:
            y, cross_kv, w = self.cross_attn(
                self.cross_attn_ln(x), xa, cross_kv=cross_kv, need_weights=need_weights,
                key_padding_mask=audio_padding,
            )
            x = x + y
        x = x + self.mlp2(kernels().gelu(self.mlp1(self.mlp_ln(x))))
        return x, cross_kv, w


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self._positional_embedding = sinusoids(n_ctx, n_state)
        self.blocks = [ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)]
        self.ln_post = nn.LayerNorm(n_state)

    def __call__(self, mel: mx.array, lengths: Optional[mx.array] = None) -> mx.array:
        """mel: (batch, frames, n_mels) -> (batch, frames // 2, n_state).

        Any ``frames`` up to twice the audio context: fewer positions is a shorter audio
        context. ``lengths`` (batch,): each window's own positions, when windows of
        different lengths share the batch. Each is then encoded as if alone: the mel
        past its end is zeroed (what the convolution's padding sees alone) and its padded
        positions are masked out of every key.
        """
        padding = None
        if lengths is not None:
            frames = mx.arange(mel.shape[1])[None, :] < 2 * lengths[:, None]
            mel = mel * frames[..., None].astype(mel.dtype)
            padding = padding_mask(lengths, mel.shape[1] // 2)
        gelu = kernels().gelu
        x = gelu(self.conv1(mel))
        x = gelu(self.conv2(x))
        n = x.shape[1]
        if n > self._positional_embedding.shape[0]:
            raise ValueError(f"audio is {n} frames, the encoder holds at most "
                             f"{self._positional_embedding.shape[0]}")
        x = x + self._positional_embedding[:n].astype(x.dtype)
        for block in self.blocks:
            x, _, _ = block(x, self_padding=padding)
        return self.ln_post(x)


def gather_rows(x: mx.array, rows: Optional[mx.array]) -> mx.array:
    """``x`` (batch, time, d) at flat ``rows`` of batch × time, as (1, len(rows), d)."""
    return x if rows is None else x.reshape(-1, x.shape[-1])[rows][None]


class TextDecoder(nn.Module):
    def __init__(self, dims: ModelDimensions):
        super().__init__()
        n_state = dims.n_text_state
        if dims.embedding_rank:
            self.token_embedding = LowRankEmbedding(dims.n_vocab, n_state, dims.embedding_rank,
                                                    dims.embedding_exact_rows or 0)
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
        audio_padding: Optional[mx.array] = None,
    ) -> tuple[mx.array, list, list]:
        """Returns (logits, or the final hidden states if ``return_hidden``, per-layer
        cross (k, v), per-layer cross-attention scores).

        ``caches`` holds the self-attention keys/values already seen, so a step only
        feeds the new tokens; ``cross_kv`` holds the encoder projections computed once
        per audio window. ``audio_padding`` (batch, positions) marks padded encoder
        positions of windows shorter than the batch's longest (:func:`padding_mask`).
        """
        offset = caches[0].offset if caches else 0
        t = tokens.shape[-1]
        x = self.token_embedding(tokens) + self.positional_embedding[offset : offset + t]
        mask = causal_mask(t, offset, x.dtype) if t > 1 else None
        cross_kv = cross_kv or [None] * len(self.blocks)
        new_cross, weights = [], []
        for i, block in enumerate(self.blocks):
            x, ckv, w = block(
                x, xa, mask=mask, cache=caches[i] if caches else None,
                cross_kv=cross_kv[i], need_weights=need_weights, audio_padding=audio_padding,
            )
            new_cross.append(ckv)
            weights.append(w)
        x = self.ln(x)
        return (x if return_hidden else self.token_embedding.as_linear(x)), new_cross, weights

    def project(self, hidden: mx.array, rows: Optional[mx.array] = None) -> mx.array:
        """Logits of final hidden states (batch, time, state). With ``rows`` (flat indices
        into batch × time) only those rows, as (1, len(rows), vocab): training scores the
        target tokens and skips the vocabulary projection over prompts and padding, which
        is most of a prompted batch's positions."""
        return self.token_embedding.as_linear(gather_rows(hidden, rows))

    def block_states(self, tokens: mx.array, xa: mx.array,
                     audio_padding: Optional[mx.array] = None) -> list[mx.array]:
        """Teacher-forced: every block's output, for distilling the decoder's internal
        states (the last one, through ``ln``, is the final hidden state)."""
        t = tokens.shape[-1]
        x = self.token_embedding(tokens) + self.positional_embedding[:t]
        mask = causal_mask(t, 0, x.dtype) if t > 1 else None
        states = []
        for block in self.blocks:
            x = block(x, xa, mask=mask, audio_padding=audio_padding)[0]
            states.append(x)
        return states

    def layer_states(self, tokens: mx.array, xa: mx.array, audio_padding: Optional[mx.array] = None,
                     rows: Optional[mx.array] = None) -> tuple[list[mx.array], mx.array]:
        """:meth:`block_states` and the logits (of ``rows`` only, as in :meth:`project`)."""
        states = self.block_states(tokens, xa, audio_padding)
        return states, self.project(self.ln(states[-1]), rows)


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

    def embed_audio(self, mel: mx.array, lengths: Optional[mx.array] = None) -> mx.array:
        """Encoder output for inference, evaluated, on the platform's fast kernels.
        ``lengths``: positions of each window when they differ (see AudioEncoder)."""
        if lengths is None:
            return backends.encode(self.encoder, mel)
        return backends.encode(lambda m: self.encoder(m, lengths), mel)

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
