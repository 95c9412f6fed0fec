"""Conversion to an MLX folder (the I/O around :mod:`surgery`), with a size report.

Everything is validated before anything is written, and the folder is written to a
temporary sibling and renamed at the end, so a failed run leaves no half folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import locks
from .folders import OutputExistsError, check_output, is_empty
from .load import build_model, resolve_dtype
from .quantize import quantize_model
from .surgery import Surgery, apply_surgery
from .weights import mlx_folder, read_checkpoint


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


def convert(source: Optional[str], mlx_path: str, dtype: str = "float16",
            surgery: Optional[Surgery] = None, force: bool = False, log=print):
    """Read ``source``, apply ``surgery``, and write an MLX model folder at ``mlx_path``.

    ``mlx_path`` is locked first, so a second conversion into it is refused at once
    (OutputBusyError); a full disk is a DiskFullError that leaves an earlier folder there.
    """
    with locks.hold(mlx_path):
        return _convert(source, Path(mlx_path), dtype, surgery or Surgery(), force, log)


def _convert(source: Optional[str], out: Path, dtype: str, surgery: Surgery, force: bool, log):
    from mlx.utils import tree_flatten

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
