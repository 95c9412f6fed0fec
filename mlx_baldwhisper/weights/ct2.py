"""Reader for CTranslate2 Whisper folders (``model.bin``), the embedded default format.

model.bin: uint32 version, string name, uint32 revision, uint32 variable count; each
variable is (string name, uint8 rank, uint32 dims[rank], uint8 dtype, uint32 nbytes,
bytes); then uint32 alias count and (alias, target) string pairs. Strings are a
uint16 length then UTF-8 bytes ending in NUL. Self-attention Q/K/V and
cross-attention K/V are fused row-wise.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

from ..dims import ModelDimensions
from .checkpoint import Checkpoint, ModelLoadError, conv_to_mlx, split_rows

DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


class _Chained:
    """Reads several files as one stream (model.bin shipped in parts)."""

    def __init__(self, paths: Iterable[Path]):
        self.files: list[BinaryIO] = [open(p, "rb") for p in paths]
        self.i = 0

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n and self.i < len(self.files):
            chunk = self.files[self.i].read(n - len(out))
            if not chunk:
                self.i += 1
                continue
            out += chunk
        if len(out) < n:
            raise ModelLoadError("model.bin ends early: the file is truncated or corrupt")
        return bytes(out)

    def close(self) -> None:
        for f in self.files:
            f.close()


def _string(f: _Chained) -> str:
    (n,) = struct.unpack("<H", f.read(2))
    return f.read(n)[:-1].decode("utf-8")


def _array(raw: bytes, dtype, dims: tuple[int, ...]) -> np.ndarray:
    if dtype == "bfloat16":
        u16 = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        return u16.view(np.float32).reshape(dims)
    return np.frombuffer(raw, dtype=dtype).reshape(dims)


def read_variables(parts: list[Path]) -> dict[str, np.ndarray]:
    f = _Chained(parts)
    try:
        struct.unpack("<I", f.read(4))
        name = _string(f)
        if "Whisper" not in name:
            raise ModelLoadError(f"model.bin holds a {name!r}, not a Whisper model")
        _revision, count = struct.unpack("<II", f.read(8))
        out: dict[str, np.ndarray] = {}
        for _ in range(count):
            var = _string(f)
            rank = f.read(1)[0]
            dims = struct.unpack(f"<{rank}I", f.read(4 * rank)) if rank else ()
            dtype_id = f.read(1)[0]
            (nbytes,) = struct.unpack("<I", f.read(4))
            if dtype_id not in DTYPES:
                raise ModelLoadError(f"model.bin variable {var!r} has unknown dtype id {dtype_id}")
            out[var] = _array(f.read(nbytes), DTYPES[dtype_id], dims)
        (n_alias,) = struct.unpack("<I", f.read(4))
        for _ in range(n_alias):
            alias, target = _string(f), _string(f)
            out[alias] = out[target]
        return out
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"model.bin is corrupt: {e}") from None
    finally:
        f.close()


def _float(v: dict[str, np.ndarray], name: str) -> np.ndarray:
    w = v[name]
    scale = v.get(name + "_scale")
    if w.dtype == np.int8 and scale is not None:  # int8 quantized CTranslate2 model
        return w.astype(np.float32) / scale.reshape(-1, 1)
    return w


def _layer_norm(v, src: str, dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = v[f"{src}/gamma"]
    out[f"{dst}.bias"] = v[f"{src}/beta"]


def _linear(v, src: str, dst: str, out: dict, bias: bool = True) -> None:
    out[f"{dst}.weight"] = _float(v, f"{src}/weight")
    if bias:
        out[f"{dst}.bias"] = v[f"{src}/bias"]


def _fused(v, src: str, dsts: list[str], out: dict) -> None:
    ws = split_rows(_float(v, f"{src}/weight"), len(dsts))
    bs = split_rows(v[f"{src}/bias"], len(dsts))
    for dst, w, b in zip(dsts, ws, bs):
        out[f"{dst}.weight"] = w
        if not dst.endswith(".key"):  # Whisper's key projection has no bias
            out[f"{dst}.bias"] = b


def _block(v, src: str, dst: str, out: dict, cross: bool) -> None:
    _layer_norm(v, f"{src}/self_attention/layer_norm", f"{dst}.attn_ln", out)
    _fused(v, f"{src}/self_attention/linear_0", [f"{dst}.attn.{p}" for p in ("query", "key", "value")], out)
    _linear(v, f"{src}/self_attention/linear_1", f"{dst}.attn.out", out)
    if cross:
        _layer_norm(v, f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln", out)
        _linear(v, f"{src}/attention/linear_0", f"{dst}.cross_attn.query", out)
        _fused(v, f"{src}/attention/linear_1", [f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"], out)
        _linear(v, f"{src}/attention/linear_2", f"{dst}.cross_attn.out", out)
    _layer_norm(v, f"{src}/ffn/layer_norm", f"{dst}.mlp_ln", out)
    _linear(v, f"{src}/ffn/linear_0", f"{dst}.mlp1", out)
    _linear(v, f"{src}/ffn/linear_1", f"{dst}.mlp2", out)


def _count_layers(v: dict, prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in v:
        n += 1
    return n


def convert(v: dict[str, np.ndarray]) -> tuple[ModelDimensions, dict[str, np.ndarray]]:
    n_enc, n_dec = _count_layers(v, "encoder"), _count_layers(v, "decoder")
    out: dict[str, np.ndarray] = {
        "encoder.conv1.weight": conv_to_mlx(_float(v, "encoder/conv1/weight")),
        "encoder.conv1.bias": v["encoder/conv1/bias"],
        "encoder.conv2.weight": conv_to_mlx(_float(v, "encoder/conv2/weight")),
        "encoder.conv2.bias": v["encoder/conv2/bias"],
        "decoder.token_embedding.weight": _float(v, "decoder/embeddings/weight"),
        "decoder.positional_embedding": v["decoder/position_encodings/encodings"],
    }
    _layer_norm(v, "encoder/layer_norm", "encoder.ln_post", out)
    _layer_norm(v, "decoder/layer_norm", "decoder.ln", out)
    for i in range(n_enc):
        _block(v, f"encoder/layer_{i}", f"encoder.blocks.{i}", out, cross=False)
    for i in range(n_dec):
        _block(v, f"decoder/layer_{i}", f"decoder.blocks.{i}", out, cross=True)
    emb = out["decoder.token_embedding.weight"]
    dims = ModelDimensions(
        n_mels=out["encoder.conv1.weight"].shape[2],
        n_audio_ctx=v["encoder/position_encodings/encodings"].shape[0],
        n_audio_state=out["encoder.conv1.weight"].shape[0],
        n_audio_head=int(np.asarray(v["encoder/num_heads"]).item()),
        n_audio_layer=n_enc,
        n_vocab=emb.shape[0],
        n_text_ctx=out["decoder.positional_embedding"].shape[0],
        n_text_state=emb.shape[1],
        n_text_head=int(np.asarray(v["decoder/num_heads"]).item()),
        n_text_layer=n_dec,
    )
    return dims, out


def model_bin_parts(folder: Path) -> list[Path]:
    whole = folder / "model.bin"
    if whole.exists():
        return [whole]
    parts = sorted(folder.glob("model.bin.part*"), key=lambda p: int(p.suffix[5:] or 0))
    return parts


def read(folder: Path, parts: list[Path] | None = None) -> Checkpoint:
    parts = parts or model_bin_parts(folder)
    if not parts:
        raise ModelLoadError(f"{folder} has no model.bin")
    try:
        dims, weights = convert(read_variables(parts))
    except KeyError as e:
        raise ModelLoadError(f"{folder}: model.bin lacks the variable {e.args[0]}") from None
    heads = None
    cfg = folder / "config.json"
    if cfg.exists():
        heads = json.loads(cfg.read_text()).get("alignment_heads")
    return Checkpoint(dims, weights, source=f"ctranslate2:{folder}", alignment_heads=heads,
                      tokenizer_dir=folder if (folder / "tokenizer.json").exists() else None)
