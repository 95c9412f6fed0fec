"""Our own model folder: config.json + weights.safetensors + tokenizer files.

config.json holds every dimension flat (as mlx-whisper does), the alignment heads,
the source checkpoint, and the BaldWhisper surgery and quantization applied, so
:func:`mlx_baldwhisper.load_model` rebuilds exactly that architecture.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx

from .. import locks
from ..diskspace import ensure_space, writing
from ..dims import ModelDimensions
from ..folders import check_output, is_model_folder
from .checkpoint import Checkpoint, ModelLoadError

log = logging.getLogger("mlx_baldwhisper")

WEIGHTS = "weights.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "vocabulary.txt", "tokenizer_config.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "special_tokens_map.json")
OWN_FILES = frozenset({WEIGHTS, "config.json", *TOKENIZER_FILES})  # all that save() writes
# Beside a folder being saved: ".NAME.mbw-tmp-*" is the new copy being written, and
# ".NAME.mbw-old-*/NAME" the earlier one while the two are swapped.
_TMP, _OLD = ".mbw-tmp-", ".mbw-old-"


def read(path: Path, cfg: dict[str, Any]) -> Checkpoint:
    files = [path / WEIGHTS] if (path / WEIGHTS).exists() else sorted(path.glob("*.safetensors"))
    if not files and (path / "weights.npz").exists():
        files = [path / "weights.npz"]
    if not files:
        raise ModelLoadError(f"{path} has a config.json but no {WEIGHTS}")
    weights: dict[str, Any] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mx.load raises bare RuntimeError/ValueError on corrupt files
            raise ModelLoadError(f"{f} is corrupt or unreadable: {e}") from None
    dims = ModelDimensions.from_dict(cfg["dims"]) if "dims" in cfg else ModelDimensions.from_config(cfg)
    extra = {k: cfg[k] for k in ("surgery", "quantization", "training", "language_tokens", "audio_context",
                                 "long_form") if k in cfg}
    return Checkpoint(
        dims, weights, source=cfg.get("source", f"mlx:{path}"),
        alignment_heads=cfg.get("alignment_heads"),
        tokenizer_dir=path if (path / "tokenizer.json").exists() else None, extra=extra,
    )


def write_config(model, folder: Path, source: str) -> None:
    cfg: dict[str, Any] = {"model_type": "whisper", "library": "mlx_baldwhisper"}
    cfg.update(model.dims.to_dict())
    cfg["alignment_heads"] = model.alignment_heads
    cfg["source"] = source
    cfg["dtype"] = str(model.dtype).replace("mlx.core.", "")
    cfg.update(model.extra_config)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def save(model, folder: Path, tokenizer_dir: Path | None, source: str) -> None:
    """Write a complete folder; the caller chooses a temporary path and renames it."""
    from mlx.utils import tree_flatten

    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / WEIGHTS), weights, metadata={"format": "mlx"})
    write_config(model, folder, source)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists() and tokenizer_dir != folder:
                shutil.copy2(tokenizer_dir / name, folder / name)


def _siblings(folder: Path, kind: str) -> list[Path]:
    return sorted(folder.parent.glob(f".{glob.escape(folder.name)}{kind}*"))


def recover(folder: Path) -> None:
    """Undo what a killed save left beside ``folder``: an earlier folder it had moved
    aside goes back in place, and its temp folders are deleted. Call under the lock."""
    for old in _siblings(folder, _OLD):
        if (old / folder.name).is_dir() and not folder.exists():
            os.replace(old / folder.name, folder)
            log.warning("restored %s, which an interrupted save had moved aside", folder)
        shutil.rmtree(old, ignore_errors=True)
    for tmp in _siblings(folder, _TMP):
        shutil.rmtree(tmp, ignore_errors=True)


def _bytes_needed(model, tokenizer_dir: Path | None) -> int:
    from mlx.utils import tree_flatten

    tokenizer = sum((tokenizer_dir / n).stat().st_size for n in TOKENIZER_FILES
                    if tokenizer_dir is not None and (tokenizer_dir / n).exists())
    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) + tokenizer


def _install(tmp: Path, folder: Path) -> None:
    """Put the complete ``tmp`` in place of ``folder`` (see :func:`save_atomic`)."""
    if not folder.exists():
        tmp.rename(folder)
        return
    if is_model_folder(folder) and {p.name for p in folder.iterdir()} <= OWN_FILES:
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}{_OLD}", dir=folder.parent))
        os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        shutil.rmtree(old)
        return
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):  # config last
        os.replace(f, folder / f.name)


def save_atomic(model, folder: Path, tokenizer_dir: Path | None, source: str,
                force: bool = False) -> None:
    """Write a complete folder into a temporary sibling, then put it in place.

    An interrupted save leaves no half folder (the next save tidies up after a killed
    one, see :func:`recover`), and only our own earlier output is replaced: a model
    folder of ours holding nothing but our files is swapped whole; one that also holds
    other files, or any folder with ``force``, gets our files replaced one by one and
    keeps the rest. A folder that is not ours is refused, as is a folder another process
    is writing (OutputBusyError); a full disk is a DiskFullError and changes nothing.
    """
    with locks.hold(folder):
        recover(folder)
        check_output(folder, force=force or is_model_folder(folder))
        folder.parent.mkdir(parents=True, exist_ok=True)
        needed = _bytes_needed(model, tokenizer_dir)
        ensure_space(folder, needed)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}{_TMP}", dir=folder.parent))
        try:
            with writing(folder, needed):
                save(model, tmp, tokenizer_dir, source)
            tmp.chmod(0o755)
            _install(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
