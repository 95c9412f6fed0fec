"""Build a :class:`Whisper` from any checkpoint source."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .model import Whisper
from .weights import Checkpoint, ModelLoadError, embedded, read_checkpoint

log = logging.getLogger("mlx_baldwhisper")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def resolve_dtype(dtype: str | mx.Dtype) -> mx.Dtype:
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _kind(dtype: Any) -> str:
    """'floating point' for any float dtype (numpy's or MLX's), else the dtype's name."""
    floating = (mx.issubdtype(dtype, mx.floating) if isinstance(dtype, mx.Dtype)
                else np.issubdtype(dtype, np.floating))
    return "floating point" if floating else str(dtype).split(".")[-1]


def check_fits(model: Whisper, weights: dict[str, Any], source: str) -> None:
    """The checkpoint's tensor names, shapes and dtypes against the model its config
    describes. MLX builds a model lazily, so this runs before anything is allocated: a
    config that asks for absurd sizes, or disagrees with its weights, costs no memory."""
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(model.parameters()))
    problems: list[str] = []
    for k in sorted(expected.keys() & weights.keys()):
        want, got = expected[k], weights[k]
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{k} is {tuple(got.shape)} where the config needs {tuple(want.shape)}")
        elif _kind(got.dtype) != _kind(want.dtype):
            problems.append(f"{k} holds {str(got.dtype).split('.')[-1]} values where the model "
                            f"needs {_kind(want.dtype)}")
    problems += [f"{k} is missing" for k in sorted(expected.keys() - weights.keys())]
    problems += [f"{k} is not part of this model" for k in sorted(weights.keys() - expected.keys())]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelLoadError(f"the weights of {source} do not match its config: "
                             f"{'; '.join(problems[:3])}{more}")


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
    check_fits(model, ckpt.weights, ckpt.source)
    target = resolve_dtype(dtype)
    weights = []
    for k, v in ckpt.weights.items():
        a = v if isinstance(v, mx.array) else mx.array(np.asarray(v))
        if mx.issubdtype(a.dtype, mx.floating):
            a = a.astype(target)
        weights.append((k, a))
    model.load_weights(weights, strict=True)
    model.set_dtype(target, predicate=lambda t: mx.issubdtype(t, mx.floating))
    mx.eval(model.parameters())
    model.source = ckpt.source
    model.tokenizer_dir = ckpt.tokenizer_dir or embedded.default_tokenizer_dir(ckpt.dims.n_vocab)
    return model


def dequantize_checkpoint(ckpt: Checkpoint) -> Checkpoint:
    """Unpack every quantized layer to float32 (the config keeps what it was, under
    ``dequantized_from``). The folder stays small on disk; in memory the model is float."""
    quant = ckpt.extra.get("quantization")
    if not quant:
        return ckpt
    from .quantize import group_size_of

    weights = dict(ckpt.weights)
    for name in [k[: -len(".scales")] for k in ckpt.weights if k.endswith(".scales")]:
        w, scales, biases = (mx.array(np.asarray(weights.pop(f"{name}.{p}")))
                             for p in ("weight", "scales", "biases"))
        gs = group_size_of(ckpt.weights, name, quant["bits"])
        weights[f"{name}.weight"] = np.array(mx.dequantize(w, scales, biases, gs, quant["bits"]))
    extra = {k: v for k, v in ckpt.extra.items() if k != "quantization"}
    extra["dequantized_from"] = quant
    return Checkpoint(ckpt.dims, weights, ckpt.source, ckpt.alignment_heads, ckpt.tokenizer_dir, extra)


def dequantize_by_default() -> bool:
    """On Linux CPU, MLX's quantized matmuls run 25-30x slower than float32 (measured,
    benchmarks/RESULTS.md), so quantized folders are unpacked at load there."""
    from .backends import cpu

    return cpu.enabled()


def load_model(path_or_name: str | os.PathLike | None = None,
               dtype: str | mx.Dtype = "float32", dequantize: Optional[bool] = None) -> Whisper:
    """Load whisper-base (default, embedded), ``tiny.en``, a folder, a ``.pt`` or a hub id.

    ``dequantize``: unpack a quantized folder to float at load (default: only on Linux CPU).
    """
    ckpt = read_checkpoint(path_or_name)
    if ckpt.extra.get("quantization") and (dequantize_by_default() if dequantize is None else dequantize):
        log.info("%d-bit weights unpacked to float at load (MLX's CPU quantized kernels are "
                 "slow on Linux; load_model(..., dequantize=False) keeps them packed)",
                 ckpt.extra["quantization"]["bits"])
        ckpt = dequantize_checkpoint(ckpt)
    model = build_model(ckpt, dtype)
    warn_if_unrecovered(model, str(path_or_name or "base"))
    return model


_warned: set[str] = set()


def warn_if_unrecovered(model: Whisper, name: str) -> None:
    """Merged or sheared weights transcribe badly until distilled: say so, once per model."""
    surgery = model.extra_config.get("surgery", {})
    if surgery.get("recovered", True) or name in _warned:
        return
    _warned.add(name)
    done = [k for k in ("decoder_merge", "decoder_removal", "encoder_merge", "embedding") if k in surgery]
    stage = "shear" if "embedding" in surgery else "recover"
    log.warning(
        "%s was compressed (%s) and never recovered by distillation, so expect poor transcripts. "
        "Recover it on your data: mlx_baldwhisper %s --teacher <uncompressed model> --student %s "
        "--train TRAIN.tsv --dev DEV.tsv --language LANG --out <recovered folder>  "
        "(README: Compress)", name, ", ".join(done), stage, name)


def checkpoint_from_model(model: Whisper) -> Checkpoint:
    """The in-memory model as a checkpoint, so surgery can run on trained weights."""
    from mlx.utils import tree_flatten

    if model.extra_config.get("quantization"):
        raise ValueError("surgery needs float weights: convert from the unquantized model")
    weights = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    return Checkpoint(model.dims.__class__(**model.dims.to_dict()), weights, model.source,
                      [list(h) for h in model.alignment_heads], model.tokenizer_dir,
                      dict(model.extra_config))
