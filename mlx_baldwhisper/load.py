"""Build a :class:`Whisper` from any checkpoint source."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .model import Whisper
from .weights import Checkpoint, ModelLoadError, embedded, read_checkpoint

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def resolve_dtype(dtype: str | mx.Dtype) -> mx.Dtype:
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def build_model(ckpt: Checkpoint, dtype: str | mx.Dtype = mx.float32) -> Whisper:
    model = Whisper(ckpt.dims, ckpt.alignment_heads)
    model.extra_config = dict(ckpt.extra)
    quant = ckpt.extra.get("quantization")
    if quant:
        from .quantize import group_size_of
        names = {k.rsplit(".", 1)[0] for k in ckpt.weights if k.endswith(".scales")}
        sizes = {n: group_size_of(ckpt.weights, n, quant["bits"]) for n in names}
        nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"],
                    class_predicate=lambda path, m: {"group_size": sizes[path], "bits": quant["bits"]}
                    if path in sizes else False)
    target = resolve_dtype(dtype)
    weights = []
    for k, v in ckpt.weights.items():
        a = v if isinstance(v, mx.array) else mx.array(np.asarray(v))
        if mx.issubdtype(a.dtype, mx.floating):
            a = a.astype(target)
        weights.append((k, a))
    try:
        model.load_weights(weights, strict=True)
    except ValueError as e:
        raise ModelLoadError(f"weights from {ckpt.source} do not fit the model: {e}") from None
    model.set_dtype(target, predicate=lambda t: mx.issubdtype(t, mx.floating))
    mx.eval(model.parameters())
    model.source = ckpt.source
    model.tokenizer_dir = ckpt.tokenizer_dir or embedded.default_tokenizer_dir(ckpt.dims.n_vocab)
    return model


def load_model(path_or_name: str | os.PathLike | None = None,
               dtype: str | mx.Dtype = "float32") -> Whisper:
    """Load whisper-base (default, embedded), ``tiny.en``, a folder, a ``.pt`` or a hub id."""
    return build_model(read_checkpoint(path_or_name), dtype)


def checkpoint_from_model(model: Whisper) -> Checkpoint:
    """The in-memory model as a checkpoint, so surgery can run on trained weights."""
    from mlx.utils import tree_flatten

    if model.extra_config.get("quantization"):
        raise ValueError("surgery needs float weights: convert from the unquantized model")
    weights = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    return Checkpoint(model.dims.__class__(**model.dims.to_dict()), weights, model.source,
                      [list(h) for h in model.alignment_heads], model.tokenizer_dir,
                      dict(model.extra_config))
