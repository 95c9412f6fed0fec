"""Crash-safe training checkpoints that resume bit-identically.

Layout under ``dir``::

    checkpoints/step-00000100/{model,optimizer[,extra]}.safetensors + state.json
    checkpoints/latest        # name of the newest complete checkpoint

A checkpoint is written into a hidden temp folder, fsynced, then renamed into
place, and only then is ``latest`` replaced (itself via temp file + rename). A
crash at any point leaves either the old or the new checkpoint, never a torn one.
``state.json`` is written last, so a folder without it is never loaded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

CKPT_DIR = "checkpoints"
LATEST = "latest"
STATE = "state.json"
_PREFIX = "step-"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_arrays(path: Path, arrays: dict[str, mx.array]) -> None:
    mx.save_safetensors(str(path), arrays)
    _fsync_path(path)


# -- random number generators ------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """JSON-able state of numpy's and Python's global RNGs and of mx.random's key."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    key = np.array(mx.random.state[0]).astype(np.uint64)
    py_version, py_state, py_gauss = random.getstate()
    return {
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "mlx_key": [int(key[0]), int(key[1])],
        "python": [py_version, list(py_state), py_gauss],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    hi, lo = state["mlx_key"]
    # mx.random.key(s) is [s >> 32, s & 0xffffffff], so seeding restores any key.
    mx.random.seed((int(hi) << 32) | int(lo))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))


# -- locating checkpoints ------------------------------------------------------------

def _step_dirs(root: Path) -> list[Path]:
    found = [p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and (p / STATE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint folder under ``dir`` (or ``dir`` itself), or None."""
    d = Path(dir)
    if (d / STATE).exists():
        return d
    root = d / CKPT_DIR
    pointer = root / LATEST
    if pointer.exists():
        cand = root / pointer.read_text(encoding="utf-8").strip()
        if (cand / STATE).exists():
            return cand
    steps = _step_dirs(root) if root.is_dir() else []
    return steps[-1] if steps else None


# -- save / load ---------------------------------------------------------------------

def save_checkpoint(
    dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: Any,
    extra_state: Optional[dict[str, Any]] = None,
    *,
    extra_modules: Optional[Mapping[str, nn.Module]] = None,
    config: Optional[dict[str, Any]] = None,
    rng_state: Optional[dict[str, Any]] = None,
    keep: int = 3,
) -> Path:
    """Write ``dir/checkpoints/step-N`` atomically, point ``latest`` at it, keep ``keep``.

    Saves every model parameter (trainable and frozen), the optimizer state (moments,
    step count, scheduled learning rate), any ``extra_modules`` (e.g. a learnable
    temperature), and a JSON with ``extra_state`` (data position, counters ...),
    ``config`` and the RNG states (``rng_state`` if given, else captured now).
    """
    root = Path(dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"{_PREFIX}{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    mx.eval(model.parameters(), optimizer.state)
    _save_arrays(tmp / "model.safetensors", dict(tree_flatten(model.parameters())))
    _save_arrays(tmp / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
    if extra_modules:
        flat = {f"{k}.{n}": v for k, m in extra_modules.items()
                for n, v in tree_flatten(m.parameters())}
        _save_arrays(tmp / "extra.safetensors", flat)
    state = {
        "step": int(step),
        "saved_at": time.time(),
        "extra_state": extra_state or {},
        "config": config or {},
        "rng": rng_state or capture_rng_state(),
    }
    with open(tmp / STATE, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(tmp)

    if final.exists():  # re-saving the same step: swap, then drop the old copy
        old = root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_path(root)
    _write_text_atomic(root / LATEST, name)
    _prune(root, keep, final)
    return final


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _prune(root: Path, keep: int, newest: Path) -> None:
    """Delete all but the ``keep`` newest checkpoints (never ``newest``) and the
    temp folders that an earlier crash left behind."""
    for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    steps = _step_dirs(root)
    for p in steps[: max(len(steps) - max(keep, 1), 0)]:
        if p != newest:
            shutil.rmtree(p, ignore_errors=True)


def read_checkpoint_state(dir: str | os.PathLike) -> dict[str, Any]:
    """The JSON part of the latest checkpoint (step, extra_state, config, rng)."""
    path = latest_checkpoint(dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint under {dir}")
    with open(path / STATE, encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint(
    dir: str | os.PathLike,
    model: nn.Module,
    optimizer: Any,
    *,
    extra_modules: Optional[Mapping[str, nn.Module]] = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore the latest checkpoint into ``model``/``optimizer``; returns its extra_state.

    The returned dict always has a ``"step"`` key. RNG states are restored too, so
    training continues exactly as if it had never stopped.
    """
    path = latest_checkpoint(dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint under {dir}")
    with open(path / STATE, encoding="utf-8") as f:
        state = json.load(f)
    model.load_weights(list(mx.load(str(path / "model.safetensors")).items()), strict=True)
    opt_flat = mx.load(str(path / "optimizer.safetensors"))
    optimizer.state = tree_unflatten(list(opt_flat.items())) if opt_flat else {}
    if extra_modules:
        flat = mx.load(str(path / "extra.safetensors"))
        for k, m in extra_modules.items():
            own = [(n[len(k) + 1:], v) for n, v in flat.items() if n.startswith(k + ".")]
            m.load_weights(own, strict=True)
    mx.eval(model.parameters(), optimizer.state)
    if restore_rng:
        restore_rng_state(state["rng"])
    extra = dict(state.get("extra_state", {}))
    extra.setdefault("step", state["step"])
    return extra
