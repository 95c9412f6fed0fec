"""Conversion to an MLX folder, with the BaldWhisper surgery: merge, shear, quantize.

Everything is validated before anything is written, and the folder is written to a
temporary sibling and renamed at the end, so a failed run leaves no half folder.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import lowrank, merge
from .load import build_model, resolve_dtype
from .weights import Checkpoint, read_checkpoint
from .weights import mlx_folder

DEFAULT_ALPHA = 0.1  # see README "Choosing α and β": measured on held-out English
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
    quantize: bool = False
    q_bits: int = 4
    q_group_size: int = 64
    report: dict[str, Any] = field(default_factory=dict)


def _part(name: str) -> str:
    if name.startswith("encoder"):
        return "encoder"
    if name.startswith("decoder.token_embedding"):
        return "embedding"
    if name.startswith("decoder.positional"):
        return "positions"
    return "decoder layers"


def component_sizes(weights: dict[str, Any]) -> dict[str, list[int]]:
    """[parameters, bytes] per component: encoder, decoder layers, embedding, positions."""
    out: dict[str, list[int]] = {}
    for name, w in weights.items():
        acc = out.setdefault(_part(name), [0, 0])
        acc[0] += int(np.prod(w.shape))
        acc[1] += int(w.nbytes)
    return out


def apply_surgery(ckpt: Checkpoint, s: Surgery) -> Checkpoint:
    """Merge (or drop) layers, then shear the embedding; records what was done."""
    record: dict[str, Any] = dict(ckpt.extra.get("surgery", {}))
    n = ckpt.dims.n_text_layer
    if s.merge and s.drop:
        raise ValueError("--merge and --drop are alternatives: choose one")
    if s.rank is not None and not 1 <= s.rank <= ckpt.dims.n_text_state:
        raise ValueError(f"--rank must be between 1 and the model width {ckpt.dims.n_text_state}, got {s.rank}")
    if s.encoder_merge_groups:
        plan = merge.make_plan(ckpt.dims.n_audio_layer, merge.parse_groups(s.encoder_merge_groups),
                               s.alpha, s.beta)
        ckpt = merge.apply_plan(ckpt, plan, "encoder")
        record["encoder_merge"] = plan.to_dict()
    if s.merge or s.merge_groups:
        groups = merge.parse_groups(s.merge_groups) if s.merge_groups else None
        weights = merge.parse_weights(s.merge_weights) if s.merge_weights else None
        if weights is not None and groups is None:
            groups = merge.adjacent_pairs(n)
        plan = merge.make_plan(n, groups, s.alpha, s.beta, weights)
        ckpt = merge.apply_plan(ckpt, plan, "decoder")
        record["decoder_merge"] = {**plan.to_dict(), "alpha": s.alpha, "beta": s.beta,
                                   "source_layers": n}
    elif s.drop:
        plan = merge.removal_plan(n, s.drop)
        ckpt = merge.apply_plan(ckpt, plan, "decoder")
        record["decoder_removal"] = {"kept": [g[0] for g in plan.groups], "source_layers": n}
    if s.rank is not None:
        ckpt, err = lowrank.shear(ckpt, s.rank)
        record["embedding"] = {"rank": s.rank, "relative_error": err}
        s.report["relative_error"] = err
    if record:
        ckpt.extra["surgery"] = record
    return ckpt


def convert(source: Optional[str], mlx_path: str, dtype: str = "float16",
            surgery: Optional[Surgery] = None, force: bool = False, log=print):
    """Read ``source``, apply ``surgery``, and write an MLX model folder at ``mlx_path``."""
    from mlx.utils import tree_flatten

    from .quantize import quantize_model

    surgery = surgery or Surgery()
    out = Path(mlx_path)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (pass --force to replace it)")
    target = resolve_dtype(dtype)
    ckpt = read_checkpoint(source)
    before = component_sizes(ckpt.weights)
    for v in before.values():  # as stored in the requested dtype
        v[1] = v[0] * target.size
    ckpt = apply_surgery(ckpt, surgery)
    model = build_model(ckpt, target)
    model.extra_config = dict(ckpt.extra)
    after = component_sizes(dict(tree_flatten(model.parameters())))
    if surgery.quantize:
        quantize_model(model, surgery.q_bits, surgery.q_group_size)
        packed = component_sizes(dict(tree_flatten(model.parameters())))
        for part, v in after.items():
            v[1] = packed[part][1]
    surgery.report.update(before=before, after=after)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        mlx_folder.save(model, tmp, ckpt.tokenizer_dir, ckpt.source)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(size_table(before, after))
    if "relative_error" in surgery.report:
        log(f"embedding rank {surgery.rank}: relative reconstruction error "
            f"‖E − AB‖/‖E‖ = {surgery.report['relative_error']:.4f}")
    log(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB on disk)")
    return model


def size_table(before: dict, after: dict) -> str:
    rows = ["| component | params before | params after | MB before | MB after |",
            "|---|---|---|---|---|"]
    total = np.zeros(4)
    for part in dict.fromkeys(list(before) + list(after)):
        row = np.array(before.get(part, [0, 0])[:1] + after.get(part, [0, 0])[:1]
                       + before.get(part, [0, 0])[1:] + after.get(part, [0, 0])[1:], dtype=float)
        total += row
        rows.append(f"| {part} | {row[0] / 1e6:.2f}M | {row[1] / 1e6:.2f}M | {row[2] / 1e6:.1f} | {row[3] / 1e6:.1f} |")
    rows.append(f"| total | {total[0] / 1e6:.2f}M | {total[1] / 1e6:.2f}M | {total[2] / 1e6:.1f} | {total[3] / 1e6:.1f} |")
    return "\n".join(rows)
