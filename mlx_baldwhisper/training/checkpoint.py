"""Crash-safe training checkpoints that resume bit-identically, and never from a torn one.

Layout under ``dir``::

    checkpoints/step-00000100/{model,optimizer[,extra]}.safetensors + state.json + manifest.json
    checkpoints/latest        # name of the newest complete checkpoint

A checkpoint is written into a hidden temp folder, fsynced, then renamed into place,
and only then is ``latest`` replaced (itself via temp file + rename), so a killed
process leaves the old or the new checkpoint, never a half one. ``manifest.json``,
written last, holds every file's size and SHA-256: a checkpoint damaged later (a
power cut that lost unsynced blocks, a bad disk, a hand edit) fails
:func:`verify_checkpoint`, and resuming falls back to the newest one that passes,
saying which it skipped. A full disk stops the save with
:class:`~mlx_baldwhisper.diskspace.DiskFullError` and leaves earlier checkpoints alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
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

from ..diskspace import ensure_space, writing

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
LATEST = "latest"
STATE = "state.json"
MANIFEST = "manifest.json"
REQUIRED = ("model.safetensors", "optimizer.safetensors", STATE)
FORMAT = 2  # in state.json: the checkpoint has a manifest (older ones have no "format")
_PREFIX = "step-"


class CorruptCheckpointError(ValueError):
    """A checkpoint folder that fails its checksums; the message says which file."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_arrays(path: Path, arrays: dict[str, mx.array]) -> None:
    mx.save_safetensors(str(path), arrays)
    _fsync_path(path)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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


# -- locating and verifying checkpoints ---------------------------------------------

def _step(p: Path) -> int:
    return int(p.name[len(_PREFIX):])


def _step_dirs(root: Path) -> list[Path]:
    found = [p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and (p / STATE).exists()]
    return sorted(found, key=_step)


def latest_checkpoint(dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint folder under ``dir`` (or ``dir`` itself), or None.

    Cheap (no checksums): for messages. Resuming goes through :func:`resumable_checkpoint`.
    """
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


# Checkpoints verified by this process, with the (name, size, mtime) of their files then:
# resuming reads the state and then the weights of one folder, and hashes it once.
_verified: dict[Path, tuple] = {}


def _signature(path: Path) -> tuple:
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir()))


def _verify_legacy(path: Path) -> Optional[str]:
    """A checkpoint written before manifests: its JSON parses and its safetensors headers
    fit their files (mx.load checks that lazily, without reading the data)."""
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        for name in REQUIRED[:2]:
            mx.load(str(path / name))
    except Exception as e:  # noqa: BLE001  any failure means: do not trust it
        return f"it has no {MANIFEST} and does not read back ({e})"
    if not isinstance(state, dict) or "format" in state:
        return f"its {MANIFEST} is missing"
    return None


def _check_files(path: Path) -> Optional[str]:
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        listed = {name: (int(f["bytes"]), str(f["sha256"])) for name, f in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"its {MANIFEST} is unreadable ({e})"
    missing = [n for n in REQUIRED if n not in listed]
    if missing:
        return f"its {MANIFEST} does not list {', '.join(missing)}"
    for name, (size, digest) in listed.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} holds {f.stat().st_size} bytes, not the {size} it was written with (torn)"
        if _sha256(f) != digest:
            return f"{name} does not match its SHA-256 checksum (damaged)"
    return None


def verify_checkpoint(path: str | os.PathLike) -> Optional[str]:
    """Why the checkpoint folder ``path`` cannot be trusted, or None when every file is whole."""
    path = Path(path)
    if not path.is_dir():
        return "it does not exist"
    signature = _signature(path)
    if _verified.get(path) == signature:
        return None
    reason = _check_files(path) if (path / MANIFEST).exists() else _verify_legacy(path)
    if reason is None:
        _verified[path] = signature
    return reason


def resumable_checkpoint(dir: str | os.PathLike) -> Optional[Path]:
    """The newest checkpoint under ``dir`` that verifies, or None; each damaged one that
    is passed over is named in a warning, with the reason."""
    d = Path(dir)
    if (d / STATE).exists():
        return d if _usable(d) else None
    root = d / CKPT_DIR
    for cand in reversed(_step_dirs(root) if root.is_dir() else []):
        if _usable(cand):
            return cand
    return None


def _usable(path: Path) -> bool:
    reason = verify_checkpoint(path)
    if reason is not None:
        log.warning("skipping the checkpoint %s: %s; falling back to the one before it", path, reason)
    return reason is None


def _resolve(dir: str | os.PathLike) -> Path:
    """``dir`` if it is a checkpoint folder that verifies, else the newest good one under it."""
    d = Path(dir)
    if (d / STATE).exists():
        reason = verify_checkpoint(d)
        if reason is not None:
            raise CorruptCheckpointError(f"the checkpoint {d} cannot be used: {reason}")
        return d
    found = resumable_checkpoint(d)
    if found is None:
        raise FileNotFoundError(f"no usable checkpoint under {dir}")
    return found


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

    mx.eval(model.parameters(), optimizer.state)
    parts = {"model": dict(tree_flatten(model.parameters())),
             "optimizer": dict(tree_flatten(optimizer.state))}
    if extra_modules:
        parts["extra"] = {f"{k}.{n}": v for k, m in extra_modules.items()
                          for n, v in tree_flatten(m.parameters())}
    state = {
        "format": FORMAT,
        "step": int(step),
        "saved_at": time.time(),
        "extra_state": extra_state or {},
        "config": config or {},
        "rng": rng_state or capture_rng_state(),
    }
    needed = sum(v.nbytes for arrays in parts.values() for v in arrays.values())
    ensure_space(final, needed)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with writing(final, needed):
            for part, arrays in parts.items():
                _save_arrays(tmp / f"{part}.safetensors", arrays)
            _write_json(tmp / STATE, state)
            _write_json(tmp / MANIFEST, {"files": {
                f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}})
            _fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

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
    """Keep the ``keep`` newest checkpoints up to ``newest``. Later ones belong to a run
    that resumed from before them (they were damaged) and go too, as do the temp
    folders that an earlier crash left behind. A checkpoint is renamed out of sight
    before it is deleted, so a crash never leaves a half-deleted one in view."""
    steps = _step_dirs(root)
    older = [p for p in steps if _step(p) < _step(newest)]
    doomed = [p for p in steps if _step(p) > _step(newest)] + older[: max(len(older) - max(keep, 1) + 1, 0)]
    for p in doomed:
        os.replace(p, root / f".old-{p.name}-{os.getpid()}")
    for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def read_checkpoint_state(dir: str | os.PathLike) -> dict[str, Any]:
    """The JSON part (step, extra_state, config, rng) of the checkpoint ``dir`` or of the
    newest good one under it."""
    with open(_resolve(dir) / STATE, encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint(
    dir: str | os.PathLike,
    model: nn.Module,
    optimizer: Any,
    *,
    extra_modules: Optional[Mapping[str, nn.Module]] = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore the checkpoint ``dir``, or the newest good one under it, into ``model`` and
    ``optimizer``; returns its extra_state.

    The returned dict always has a ``"step"`` key. RNG states are restored too, so
    training continues exactly as if it had never stopped. A checkpoint that fails its
    checksums is never loaded.
    """
    path = _resolve(dir)
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
