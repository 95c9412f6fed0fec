"""A full disk while writing: one clear error that names the path and the space it needs.

A full disk shows up as ENOSPC/EDQUOT from Python, or as MLX's bare ``[write] Unable
to write`` RuntimeError. Writers check the free space before they start
(:func:`ensure_space`) and wrap the writing in :func:`writing`, which turns either
failure into :class:`DiskFullError`; they write into a temporary path and delete it
on failure, so an earlier output at the path stays as it was. Single files do all this
with :func:`replace_file` (written whole) and :func:`append_file` (a log line added whole).
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

# Filesystem metadata, the small JSON files and rounding: asked for on top of the data.
MARGIN = 1 << 20


class DiskFullError(OSError):
    """Not enough free disk space for an output; the message names it and what it needs."""


def free_bytes(path: str | os.PathLike) -> int:
    """Free space on the disk that holds ``path`` (or would hold it, once created)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def size_text(n: float) -> str:
    if n < 1e6:
        return f"{n / 1e3:.1f} KB"
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def disk_full(path: str | os.PathLike, needed: int) -> DiskFullError:
    return DiskFullError(
        f"not enough disk space to write {path}: it needs about {size_text(needed + MARGIN)} "
        f"and {size_text(free_bytes(path))} is free there. Free some space or choose another "
        f"output folder, then rerun the same command (nothing earlier was replaced)")


def ensure_space(path: str | os.PathLike, needed: int) -> None:
    """Refuse before writing ``needed`` bytes at ``path`` when they cannot fit."""
    if free_bytes(path) < needed + MARGIN:
        raise disk_full(path, needed)


def _is_disk_full(e: BaseException, path: str | os.PathLike, needed: int) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    # MLX reports a failed write without an errno: judge by the space left.
    return (isinstance(e, RuntimeError) and "unable to write" in str(e).lower()
            and free_bytes(path) < needed + MARGIN)


@contextmanager
def writing(path: str | os.PathLike, needed: int) -> Iterator[None]:
    """Turn a write that fails for lack of space into :class:`DiskFullError` for ``path``.

    The caller removes its partial output (a ``finally`` around this block)."""
    try:
        yield
    except DiskFullError:
        raise
    except (OSError, RuntimeError) as e:
        if _is_disk_full(e, path, needed):
            raise disk_full(path, needed) from None
        raise


def replace_file(path: str | os.PathLike, data: str | bytes, tmp: Optional[Path] = None) -> None:
    """Replace ``path`` whole (text as UTF-8): written to ``tmp`` beside it, then renamed
    over it, so a kill or a full disk leaves the earlier file as it was, and a full disk
    is a :class:`DiskFullError` naming ``path``."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path, len(raw)):
            tmp.write_bytes(raw)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def append_file(path: str | os.PathLike, data: str | bytes) -> None:
    """Add ``data`` at the end of ``path`` whole or not at all: a failed write (a full
    disk: :class:`DiskFullError` naming ``path``) cuts the file back to where it ended."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            with writing(path, len(raw)):
                rest = memoryview(raw)
                while rest:
                    rest = rest[os.write(fd, rest):]
        except BaseException:
            os.ftruncate(fd, end)  # frees space, so it works on a full disk too
            raise
    finally:
        os.close(fd)
