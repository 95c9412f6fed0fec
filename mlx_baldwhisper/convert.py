"""Conversion to an MLX folder, with the BaldWhisper surgery: merge, shear, quantize.

Everything is validated before anything is written, and the folder is written to a
temporary sibling and renamed at the end, so a failed run leaves no half folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import lowrank, merge
from .folders import OutputExistsError, check_output, is_empty
from .load import build_model, resolve_dtype
from .quantize import check_quantization, quantize_model
from .weights import Checkpoint, mlx_folder, read_checkpoint

log = logging.getLogger("mlx_baldwhisper")
DEFAULT_ALPHA = 0.1  # measured, see docs/COMPRESSION.md "Choosing α and β" (only α/(α+β) matters)
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


def _part(name: str) -> str:
    if name.startswith("encoder"):
        return "encoder"
    if name.startswith("decoder.token_embedding"):
        return "embedding"
    if name.startswith("decoder.positional"):
        return "decoder positions"
    return "decoder layers"


def component_sizes(weights: dict[str, Any]) -> dict[str, list[int]]:
    """[parameters, bytes] per component: encoder, decoder layers, embedding, positions."""
    out: dict[str, list[int]] = {}
    for name, w in weights.items():
        acc = out.setdefault(_part(name), [0, 0])
        acc[0] += int(np.prod(w.shape))
        acc[1] += int(w.nbytes)
    return out


def fixed_positions(dims) -> int:
    """The encoder's sinusoidal positions: computed, never stored, so not in our counts,
    but part of the usual quoted size (whisper-base: 71.83M stored + 0.77M = 72.6M)."""
    return dims.n_audio_ctx * dims.n_audio_state


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
        ckpt, err = lowrank.shear(ckpt, s.rank, s.token_weights)
        record["embedding"] = {"rank": s.rank, "relative_error": err,
                               "init": "svd" if s.token_weights is None else "frequency-weighted svd"}
        s.report["relative_error"] = err
    if record:
        if s.changes_layers:
            record["recovered"] = False  # until a training stage distils it (see load.py)
        ckpt.extra["surgery"] = record
    return ckpt


def convert(source: Optional[str], mlx_path: str, dtype: str = "float16",
            surgery: Optional[Surgery] = None, force: bool = False, log=print):
    """Read ``source``, apply ``surgery``, and write an MLX model folder at ``mlx_path``."""
    from mlx.utils import tree_flatten

    surgery = surgery or Surgery()
    out = Path(mlx_path)
    check_output(out, force, option="--mlx-path")
    if out.is_dir() and not is_empty(out) and not force:
        raise OutputExistsError(f"--mlx-path {out} is an existing model folder "
                                f"(pass --force to replace it)")
    target = resolve_dtype(dtype)
    ckpt = read_checkpoint(source)
    before = component_sizes(ckpt.weights)
    for v in before.values():  # as stored in the requested dtype
        v[1] = v[0] * target.size
    ckpt = apply_surgery(ckpt, surgery)
    model = build_model(ckpt, target)
    after = component_sizes(dict(tree_flatten(model.parameters())))
    if surgery.quantize:
        quantize_model(model, surgery.q_bits, surgery.q_group_size)
        packed = component_sizes(dict(tree_flatten(model.parameters())))
        for part, v in after.items():
            v[1] = packed[part][1]
    fixed = fixed_positions(model.dims)
    surgery.report.update(before=before, after=after, fixed_positions=fixed)
    mlx_folder.save_atomic(model, out, ckpt.tokenizer_dir, ckpt.source, force=force)
    log(size_table(before, after, fixed))
    if "relative_error" in surgery.report:
        log(f"embedding rank {surgery.rank}: relative reconstruction error "
            f"‖E − AB‖/‖E‖ = {surgery.report['relative_error']:.4f}")
    log(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB on disk)")
    return model


def size_table(before: dict, after: dict, fixed: int = 0) -> str:
    """Params and MB per component, before and after, plus totals in both conventions."""
    def line(name: str, row) -> str:
        return (f"| {name} | {row[0] / 1e6:.2f}M | {row[1] / 1e6:.2f}M "
                f"| {row[2] / 1e6:.1f} | {row[3] / 1e6:.1f} |")

    rows = ["| component | params before | params after | MB before | MB after |",
            "|---|---|---|---|---|"]
    total = np.zeros(4)
    for part in dict.fromkeys(list(before) + list(after)):
        b, a = before.get(part, [0, 0]), after.get(part, [0, 0])
        row = np.array([b[0], a[0], b[1], a[1]], dtype=float)
        total += row
        rows.append(line(part, row))
    rows.append(line("total stored", total))
    if fixed:
        rows.append(line("encoder sinusoidal positions (computed, not stored)", [fixed, fixed, 0, 0]))
        total = total + [fixed, fixed, 0, 0]
        rows.append(line("total, conventional count", total))
    rows.append(f"\nparameters after/before: {total[1] / total[0]:.1%}"
                + (" (conventional count, fixed positions included)" if fixed else ""))
    return "\n".join(rows)
