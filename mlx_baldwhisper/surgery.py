"""The BaldWhisper surgery in one place: what to change (:class:`Surgery`), checking it,
applying it to a checkpoint, and :func:`compress` for a model in memory.

The two operations themselves live in their own modules: layer merging in ``merge.py``,
the low-rank tied embedding in ``lowrank.py``. A changed model transcribes badly until a
training stage recovers it, so the record written into the model says whether one has.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import lowrank, merge
from .quantize import check_quantization
from .weights.checkpoint import Checkpoint

log = logging.getLogger("mlx_baldwhisper")
# Merge weights (α·W_lower + β·W_upper)/(α+β): measured, see docs/COMPRESSION.md "Choosing α
# and β" (only α/(α+β) matters). The one source of these defaults.
DEFAULT_ALPHA = 0.1
DEFAULT_BETA = 1.0


@dataclass
class Surgery:
    merge: bool = False
    merge_groups: Optional[str] = None
    encoder_merge_groups: Optional[str] = None
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    merge_weights: Optional[str] = None
    drop: Optional[int] = None  # keep this many decoder layers (removal baseline)
    rank: Optional[int] = None
    # Per-token weights for the factorisation (see lowrank.factorize); the shear stage
    # passes token frequencies of the training text. None: plain truncated SVD.
    token_weights: Optional[Any] = None
    # Keep this many last rows of the embedding (special and timestamp tokens) exact.
    exact_rows: int = 0
    quantize: bool = False
    q_bits: int = 4
    q_group_size: int = 64
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def merges_decoder(self) -> bool:
        return bool(self.merge or self.merge_groups or self.merge_weights)

    @property
    def changes_layers(self) -> bool:
        """Merging, removal or factoring: changes that need recovery training."""
        return (self.merges_decoder or bool(self.encoder_merge_groups) or self.drop is not None
                or self.rank is not None)

    @property
    def changes_weights(self) -> bool:
        return self.changes_layers or self.quantize


def break_even_rank(n_vocab: int, width: int) -> int:
    """The rank from which A (V×r) plus B (r×d) hold at least as many numbers as E (V×d)."""
    return -(-n_vocab * width // (n_vocab + width))


def check_request(ckpt: Checkpoint, s: Surgery) -> None:
    """Refuse impossible or ambiguous requests before any work is done."""
    d = ckpt.dims.n_text_state
    if s.merges_decoder and s.drop is not None:
        raise ValueError("--merge and --drop are alternatives: choose one")
    if s.rank is not None and not 1 <= s.rank <= d:
        raise ValueError(f"--rank must be between 1 and the model width {d}, got {s.rank}")
    if s.rank is not None and s.rank >= break_even_rank(ckpt.dims.n_vocab, d):
        log.warning("--rank %d saves no parameters: factoring a %d x %d embedding pays only below "
                    "rank %d (V·d/(V+d))", s.rank, ckpt.dims.n_vocab, d,
                    break_even_rank(ckpt.dims.n_vocab, d))
    if s.quantize:
        check_quantization(s.q_bits, s.q_group_size)
    if ckpt.extra.get("quantization") and s.changes_weights:
        raise ValueError("this model is quantized: convert from the float model instead")


def apply_surgery(ckpt: Checkpoint, s: Surgery) -> Checkpoint:
    """Merge (or drop) layers, then shear the embedding; records what was done."""
    check_request(ckpt, s)
    record: dict[str, Any] = dict(ckpt.extra.get("surgery", {}))
    n = ckpt.dims.n_text_layer
    if s.encoder_merge_groups:
        n_audio = ckpt.dims.n_audio_layer
        plan = merge.make_plan(n_audio, merge.parse_groups(s.encoder_merge_groups), s.alpha, s.beta)
        ckpt = merge.apply_plan(ckpt, plan, "encoder")
        record["encoder_merge"] = {**plan.to_dict(), "alpha": s.alpha, "beta": s.beta,
                                   "source_layers": n_audio}
    if s.merges_decoder:
        groups = merge.parse_groups(s.merge_groups) if s.merge_groups else None
        weights = merge.parse_weights(s.merge_weights) if s.merge_weights else None
        plan = merge.make_plan(n, groups, s.alpha, s.beta, weights)
        ckpt = merge.apply_plan(ckpt, plan, "decoder")
        record["decoder_merge"] = {**plan.to_dict(), "alpha": s.alpha, "beta": s.beta,
                                   "source_layers": n}
    elif s.drop is not None:
        plan = merge.removal_plan(n, s.drop)
        ckpt = merge.apply_plan(ckpt, plan, "decoder")
        record["decoder_removal"] = {"kept": [g[0] for g in plan.groups], "source_layers": n}
    if s.rank is not None:
        ckpt, err = factor_embedding(ckpt, s.rank, s.token_weights, s.exact_rows)
        record["embedding"] = {"rank": s.rank, "relative_error": err, "exact_rows": s.exact_rows,
                               "init": "svd" if s.token_weights is None else "frequency-weighted svd"}
        s.report["relative_error"] = err
    if record:
        if s.changes_layers:
            record["recovered"] = False  # until a training stage distils it (see load.py)
        ckpt.extra["surgery"] = record
    return ckpt


def factor_embedding(ckpt: Checkpoint, rank: int, token_weights: Optional[np.ndarray] = None,
                     exact_rows: int = 0) -> tuple[Checkpoint, float]:
    """A checkpoint whose tied embedding is replaced by its rank-``rank`` factors, its last
    ``exact_rows`` rows kept whole.

    Returns (new checkpoint, relative reconstruction error ‖E − AB‖/‖E‖ of the factored rows).
    """
    key = "decoder.token_embedding.weight"
    if key not in ckpt.weights:
        raise ValueError("this model's embedding is already factored; shear the full model")
    E = np.asarray(ckpt.weights[key], dtype=np.float32)
    if not 0 <= exact_rows < E.shape[0]:
        raise ValueError(f"exact_rows must be between 0 and {E.shape[0] - 1}, got {exact_rows}")
    split = E.shape[0] - exact_rows
    A, B, err = lowrank.factorize(E[:split], rank, None if token_weights is None
                                  else np.asarray(token_weights)[:split])
    weights = {k: v for k, v in ckpt.weights.items() if k != key}
    weights["decoder.token_embedding.A.weight"] = A
    weights["decoder.token_embedding.B"] = B
    if exact_rows:
        weights["decoder.token_embedding.exact"] = E[split:].copy()
    dims = ckpt.dims.__class__(**ckpt.dims.to_dict())
    dims.embedding_rank = rank
    dims.embedding_exact_rows = exact_rows or None
    return Checkpoint(dims, weights, ckpt.source, ckpt.alignment_heads, ckpt.tokenizer_dir,
                      dict(ckpt.extra)), err


def compress(model, surgery: Surgery):
    """The in-memory ``model`` with ``surgery`` applied: a new model that keeps the
    original's tokenizer, source and config records."""
    from .load import build_model, checkpoint_from_model

    student = build_model(apply_surgery(checkpoint_from_model(model), surgery), model.dtype)
    student.tokenizer_dir, student.source = model.tokenizer_dir, model.source
    return student
