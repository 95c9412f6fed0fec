"""Output folders we own: recognising them, refusing anyone else's, replacing only ours.

A user's ``--out`` may name a folder full of their own files (``--out .``, ``--out ~``).
So nothing here deletes or replaces a folder unless it is recognisably ours:

* a model folder: ``config.json`` with ``"library": "mlx_baldwhisper"``;
* a run folder (training checkpoints, a recipe's results): it holds :data:`MARKER`,
  written when we create it (or, from before the marker, ``checkpoints/latest`` or
  ``results.json``).

Anything else that exists and is not empty is refused, unless the user passes
``--force``; even then we only write our own files into it and delete nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MARKER = ".mlx_baldwhisper"
LIBRARY = "mlx_baldwhisper"


class OutputExistsError(FileExistsError):
    """``--out`` names something that is not ours; the message says what to do."""


def is_model_folder(path: Path) -> bool:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("library") == LIBRARY


def is_ours(path: Path) -> bool:
    path = Path(path)
    legacy = (path / "checkpoints" / "latest").exists() or (path / "results.json").exists()
    return path.is_dir() and ((path / MARKER).exists() or is_model_folder(path) or legacy)


def is_empty(path: Path) -> bool:
    """Nothing in it but the lock files of our writers (see :mod:`mlx_baldwhisper.locks`)."""
    return all(p.name.startswith(".") and p.name.endswith(".lock") for p in Path(path).iterdir())


def check_output(path: Path, force: bool = False, option: str = "--out") -> None:
    """Refuse a target that exists and is not ours (nor empty), before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{option} {path} exists and is not a folder")
    if path.is_dir() and not force and not is_empty(path) and not is_ours(path):
        raise OutputExistsError(
            f"{option} {path} already exists and holds files that mlx_baldwhisper did not write; "
            f"choose a new or empty folder, or pass --force to write into it (files of ours "
            f"are overwritten there, nothing else is deleted)")


def claim_run_folder(path: Path, force: bool = False, option: str = "--out") -> Path:
    """Create (or accept) a run folder and mark it ours, so later runs may resume in it."""
    path = Path(path)
    check_output(path, force, option)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / MARKER
    if not marker.exists():
        marker.write_text("This folder was written by mlx_baldwhisper (training runs).\n")
    return path


def run_folder(out: Path) -> Path:
    """A stage's checkpoints live beside its model folder: ``OUT.run``."""
    out = Path(os.path.abspath(out))
    return out.with_name(out.name + ".run")
