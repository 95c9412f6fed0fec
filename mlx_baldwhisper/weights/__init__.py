"""One loader, one reader per checkpoint format."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..dims import InvalidDimensionsError
from .checkpoint import Checkpoint, ModelLoadError, validate
from . import ct2, embedded


def read_checkpoint(path_or_name: str | os.PathLike | None = None) -> Checkpoint:
    """Read weights from an embedded name, a local file/folder, or a Hugging Face hub id.

    Dimensions, alignment heads, quantization and tokenizer are checked here; any
    disagreement is a ModelLoadError naming it, raised before a model is built.
    """
    name = str(path_or_name) if path_or_name is not None else embedded.DEFAULT_MODEL
    try:
        ckpt = _read(name)
    except InvalidDimensionsError as e:
        raise ModelLoadError(f"{name}: {e}") from None
    validate(ckpt)
    return ckpt


def _read(name: str) -> Checkpoint:
    if embedded.is_embedded(name) and not Path(name).exists():
        return embedded.read(name)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            from . import openai_pt
            return openai_pt.read(path)
        if path.name == "model.bin":
            return ct2.read(path.parent)
        raise ModelLoadError(f"{path}: not a Whisper checkpoint (expected a .pt file or a model folder)")
    if path.is_dir():
        return read_folder(path)
    if path.is_absolute() or name.startswith(".") or os.sep in name and name.count("/") != 1:
        raise ModelLoadError(f"model path {name!r} does not exist")
    from . import hf
    ckpt = read_folder(hf.download(name))
    ckpt.source = f"hf-hub:{name}"
    return ckpt


def read_folder(path: Path) -> Checkpoint:
    config = path / "config.json"
    if (path / "model.bin").exists() or any(path.glob("model.bin.part*")):
        return ct2.read(path)
    if not config.exists():
        raise ModelLoadError(f"{path} is not a model folder: it has no config.json")
    try:
        cfg = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{config} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{config} must hold a JSON object, not {type(cfg).__name__}")
    if "n_audio_state" in cfg or "dims" in cfg:
        from . import mlx_folder
        return mlx_folder.read(path, cfg)
    if "d_model" in cfg:
        from . import hf
        return hf.read_folder(path, cfg)
    raise ModelLoadError(f"{config} describes no Whisper model this loader knows")


__all__ = ["Checkpoint", "ModelLoadError", "read_checkpoint", "read_folder"]
