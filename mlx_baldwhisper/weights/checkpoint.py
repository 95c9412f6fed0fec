"""The common form every weight reader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..dims import ModelDimensions


class ModelLoadError(ValueError):
    """A model folder or checkpoint that cannot be read; the message says why."""


@dataclass
class Checkpoint:
    """Weights named and laid out as in :mod:`mlx_baldwhisper.model` (float arrays, MLX conv layout)."""

    dims: ModelDimensions
    weights: dict[str, np.ndarray]
    source: str
    alignment_heads: Optional[list[list[int]]] = None
    tokenizer_dir: Optional[Path] = None
    extra: dict[str, Any] = field(default_factory=dict)


def split_rows(w: np.ndarray, parts: int) -> list[np.ndarray]:
    """Un-fuse a fused projection (Q,K,V or K,V stacked along the output dimension)."""
    if w.shape[0] % parts:
        raise ModelLoadError(f"fused projection of {w.shape[0]} rows cannot split in {parts}")
    return np.split(w, parts, axis=0)


def conv_to_mlx(w: np.ndarray) -> np.ndarray:
    """PyTorch Conv1d weight (out, in, k) -> MLX (out, k, in)."""
    return np.ascontiguousarray(w.transpose(0, 2, 1))
