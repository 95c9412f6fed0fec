"""Our own model folder: config.json + weights.safetensors + tokenizer files.

config.json holds every dimension flat (as mlx-whisper does), the alignment heads,
the source checkpoint, and the BaldWhisper surgery and quantization applied, so
:func:`mlx_baldwhisper.load_model` rebuilds exactly that architecture.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..dims import ModelDimensions
from .checkpoint import Checkpoint, ModelLoadError

WEIGHTS = "weights.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "vocabulary.txt", "tokenizer_config.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "special_tokens_map.json")
OWN_FILES = frozenset({WEIGHTS, "config.json", *TOKENIZER_FILES})  # all that save() writes


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
    extra = {k: cfg[k] for k in ("surgery", "quantization", "training", "language_tokens") if k in cfg}
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


def save_atomic(model, folder: Path, tokenizer_dir: Path | None, source: str,
                force: bool = False) -> None:
    """Write a complete folder into a temporary sibling, then put it in place.

    An interrupted save leaves no half folder, and only our own earlier output is
    replaced: a model folder of ours holding nothing but our files is swapped whole;
    one that also holds other files, or any folder with ``force``, gets our files
    replaced one by one and keeps the rest. A folder that is not ours is refused.
    """
    import os
    import tempfile

    from ..folders import check_output, is_model_folder

    check_output(folder, force=force or is_model_folder(folder))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save(model, tmp, tokenizer_dir, source)
        tmp.chmod(0o755)
        if not folder.exists():
            tmp.rename(folder)
            return
        if is_model_folder(folder) and {p.name for p in folder.iterdir()} <= OWN_FILES:
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old)
            return
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):  # config last
            os.replace(f, folder / f.name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
