"""The common form every weight reader produces, and the checks that its parts agree."""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from functools import lru_cache
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


# -- agreement between a checkpoint's parts, checked before any model is built ----------

N_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|>, the ids right after <|notimestamps|>
QUANT_BITS, QUANT_GROUPS = (2, 3, 4, 5, 6, 8), (32, 64, 128)


def validate(ckpt: Checkpoint) -> None:
    """Refuse a checkpoint whose alignment heads, quantization or tokenizer do not fit
    its dimensions, or whose long-form policy is not a set of flags. (Tensor names, shapes and dtypes are checked against the lazily
    built model, in :func:`mlx_baldwhisper.load.build_model`.)"""
    check_alignment_heads(ckpt.alignment_heads, ckpt.dims)
    check_quantization(ckpt)
    check_long_form(ckpt)
    if ckpt.tokenizer_dir is not None and (Path(ckpt.tokenizer_dir) / "tokenizer.json").exists():
        check_tokenizer(Path(ckpt.tokenizer_dir) / "tokenizer.json", ckpt.dims.n_vocab)


def _index(x: Any, high: int) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and 0 <= x < high


def check_alignment_heads(heads: Any, dims: ModelDimensions) -> None:
    if heads is None:
        return
    if not (isinstance(heads, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and _index(p[0], dims.n_text_layer)
            and _index(p[1], dims.n_text_head) for p in heads)):
        raise ModelLoadError(f"alignment_heads must be [layer, head] pairs within the model's "
                             f"{dims.n_text_layer} layers and {dims.n_text_head} heads, not {heads!r:.120}")


def check_quantization(ckpt: Checkpoint) -> None:
    quant = ckpt.extra.get("quantization")
    if quant is None:
        return
    if not (isinstance(quant, dict) and quant.get("bits") in QUANT_BITS
            and quant.get("group_size") in QUANT_GROUPS):
        raise ModelLoadError(f"quantization must give bits in {QUANT_BITS} and group_size in "
                             f"{QUANT_GROUPS}, not {quant!r:.120}")
    for name in (k[: -len(".scales")] for k in ckpt.weights if k.endswith(".scales")):
        parts = [ckpt.weights.get(f"{name}.{p}") for p in ("weight", "scales", "biases")]
        if any(p is None or len(p.shape) != 2 for p in parts) or not parts[1].shape[-1]:
            raise ModelLoadError(f"the quantized layer {name} lacks a 2-D weight, scales or biases")


def check_long_form(ckpt: Checkpoint) -> None:
    """The model's long-form policy (transcribe's resume_early_end, ...) holds only flags."""
    policy = ckpt.extra.get("long_form", {})
    if not isinstance(policy, dict) or not all(isinstance(v, bool) for v in policy.values()):
        raise ModelLoadError(f"long_form must map settings to true/false, not {policy!r:.80}")


@lru_cache(maxsize=8)
def _tokenizer_ids(path: str, _mtime_ns: int, _size: int) -> tuple[int, Optional[int]]:
    """(largest id, id of <|notimestamps|>) of a tokenizer.json (cached while unchanged)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        added = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []}
        ids = [int(i) for i in vocab.values()] + list(added.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"{path} is not a readable tokenizer.json ({type(e).__name__}: {e})") from None
    return max(ids, default=-1), added.get("<|notimestamps|>")


def check_tokenizer(path: Path, n_vocab: int) -> None:
    """A tokenizer whose ids, timestamps included, do not fill exactly the model's
    vocabulary belongs to another model: ids past it would index beyond the embedding."""
    st = path.stat()
    largest, no_timestamps = _tokenizer_ids(str(path), st.st_mtime_ns, st.st_size)
    if no_timestamps is None:
        raise ModelLoadError(f"{path} is not a Whisper tokenizer: it has no <|notimestamps|> token")
    if largest >= n_vocab or no_timestamps + 1 + N_TIMESTAMPS != n_vocab:
        raise ModelLoadError(
            f"{path} does not match the model: its tokens and timestamps need "
            f"{max(largest + 1, no_timestamps + 1 + N_TIMESTAMPS)} ids, but the model's "
            f"vocabulary (n_vocab) holds {n_vocab}; the tokenizer belongs to another model")
