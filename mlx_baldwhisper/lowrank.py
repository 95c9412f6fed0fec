"""BaldWhisper stage 2, "head shearing": a low-rank tied token embedding and its SVD init.

The V×d embedding E is replaced by A (V×r) · B (r×d). A token looks up its row of
A and multiplies by B; the output projection runs hidden → Bᵀ → Aᵀ, so logits still
cover the full vocabulary. Initialised from a truncated SVD of E with √S split
into both factors, which is the best rank-r approximation in Frobenius norm.

Optionally the last ``exact_rows`` rows (Whisper's special and timestamp tokens, which
drive long-form seeking and sit past the text vocabulary) stay whole in a small dense
table: a rank-96 factor blurred neighbouring timestamps (cosine 0.982 vs 0.943) and, with
the fine-tuned decoder kept, kept special rows cut long-form WER from 66.1 to 56.5
(benchmarks/RESULTS.md, session 8), for 1,608 × 512 more numbers in whisper-base.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class LowRankEmbedding(nn.Module):
    def __init__(self, n_vocab: int, dims: int, rank: int, exact_rows: int = 0):
        super().__init__()
        # A is an Embedding so that MLX quantization applies to the large factor.
        self.A = nn.Embedding(n_vocab - exact_rows, rank)
        self.B = mx.random.normal((rank, dims)) * (1.0 / rank) ** 0.5
        if exact_rows:  # a plain array: never quantized
            self.exact = mx.zeros((exact_rows, dims))

    @property
    def n_factored(self) -> int:
        """Token ids below this are looked up through A·B, the rest in ``exact``."""
        return self.A.weight.shape[0]  # quantized or not, one row per token

    def __call__(self, tokens: mx.array) -> mx.array:
        if "exact" not in self:
            return self.A(tokens) @ self.B
        split = self.n_factored
        low = self.A(mx.minimum(tokens, split - 1)) @ self.B
        high = self.exact[mx.maximum(tokens - split, 0)]
        return mx.where(mx.expand_dims(tokens >= split, -1), high.astype(low.dtype), low)

    def as_linear(self, x: mx.array) -> mx.array:
        low = self.A.as_linear(x @ self.B.T)
        if "exact" not in self:
            return low
        return mx.concatenate([low, (x @ self.exact.T).astype(low.dtype)], axis=-1)

    @property
    def weight(self) -> mx.array:
        """The full E ≈ A·B (with the exact rows), for analysis and feature losses."""
        low = self.A.weight @ self.B
        return low if "exact" not in self else mx.concatenate([low, self.exact], axis=0)

    @property
    def rank(self) -> int:
        return self.B.shape[0]


def factorize(E: np.ndarray, rank: int,
              token_weights: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Truncated SVD of E with √S in both factors; returns (A, B, relative error).

    The SVD E = U S Vᵀ is taken through the small d×d Gram matrix EᵀE = V S² Vᵀ (ten
    times faster than a full SVD of the V×d matrix): B = √S_r V_rᵀ and
    A = E V_r S_r^(-1/2) = U_r √S_r, so A·B = E V_r V_rᵀ, which is exactly E at rank d.

    ``token_weights`` (one per row, e.g. token frequencies in the training text) choose
    the kept directions from the weighted Gram matrix Eᵀ·diag(w)·E instead: the r-dim
    subspace that best preserves the rows that are actually used (a weighted least-squares
    optimum), with S_i = ‖E v_i‖ still splitting the scale between the factors.
    """
    v, d = E.shape
    if not 1 <= rank <= d:
        raise ValueError(f"rank must be between 1 and the model width {d}, got {rank}")
    E64 = E.astype(np.float64)
    if token_weights is None:
        gram = E64.T @ E64
    else:
        w = np.asarray(token_weights, dtype=np.float64)
        if w.shape != (v,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"token_weights must be {v} non-negative numbers, not all zero")
        gram = (E64 * w[:, None]).T @ E64
    eig, V = np.linalg.eigh(gram)  # ascending
    order = np.argsort(eig)[::-1][:rank]
    Vr = V[:, order]
    EV = E64 @ Vr  # = U_r S_r for the plain SVD
    root = np.sqrt(np.maximum(np.linalg.norm(EV, axis=0), np.finfo(np.float64).tiny))
    A = EV / root[None, :]
    B = root[:, None] * Vr.T
    err = float(np.linalg.norm(E64 - A @ B) / np.linalg.norm(E64))
    return A.astype(np.float32), B.astype(np.float32), err
