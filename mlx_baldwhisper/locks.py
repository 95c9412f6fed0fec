"""One writer per output: a lock file beside the output, held with ``flock``.

``hold(path)`` takes ``.NAME.lock`` in the output's parent folder and writes the
holder's PID, host and command into it. A second process asking for the same output
is refused at once with :class:`OutputBusyError`, which names that PID. The kernel
drops a ``flock`` when its process dies, even by ``kill -9``, so a lock file left
behind by a dead process is taken over (and reported) rather than blocking forever.
Locks are re-entrant within a process: a stage holds its output while its model
saver takes the same lock again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

log = logging.getLogger("mlx_baldwhisper")


class OutputBusyError(OSError):
    """Another live process writes this output; the message names its PID."""


@dataclass
class _Held:
    fd: Optional[int]  # None where the filesystem cannot lock
    count: int


_held: dict[Path, _Held] = {}
_guard = threading.Lock()


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock"


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _holder(fd: int) -> dict[str, Any]:
    """What the live holder wrote; it writes right after locking, so wait a moment for it."""
    for _ in range(20):
        info = _read(fd)
        if info:
            return info
        time.sleep(0.01)
    return {}


def _busy(target: Path, info: dict[str, Any]) -> OutputBusyError:
    pid = info.get("pid", "unknown")
    host = info.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    since = f", since {info['since']}" if info.get("since") else ""
    command = f": {info['command']}" if info.get("command") else ""
    return OutputBusyError(
        f"{target} is being written by another process (PID {pid}{where}{since}{command}). "
        f"Wait for it to finish or stop it; two processes writing one output would corrupt it")


def _same_file(path: Path, fd: int) -> bool:
    """False when the holder removed the lock file between our open and our flock."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _take(target: Path, path: Path) -> Optional[int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(fd)
            os.close(fd)
            raise _busy(target, info) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("cannot lock %s on this filesystem (%s): make sure no other process "
                        "writes it at the same time", target, e.strerror)
            return None
        if _same_file(path, fd):
            break
        os.close(fd)
    left = _read(fd)
    if left.get("pid") not in (None, os.getpid()):
        log.warning("%s: taking over the lock left by process %s, which is no longer running",
                    target, left["pid"])
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def acquire(target: str | os.PathLike) -> None:
    """Lock ``target`` for this process (re-entrant), or raise :class:`OutputBusyError`."""
    path = lock_path(target)
    with _guard:
        if path in _held:
            _held[path].count += 1
            return
        _held[path] = _Held(_take(Path(os.path.abspath(target)), path), 1)


def release(target: str | os.PathLike) -> None:
    path = lock_path(target)
    with _guard:
        held = _held[path]
        held.count -= 1
        if held.count:
            return
        del _held[path]
        if held.fd is not None:
            path.unlink(missing_ok=True)  # while still locked: see _same_file
            os.close(held.fd)


@contextmanager
def hold(target: str | os.PathLike) -> Iterator[None]:
    acquire(target)
    try:
        yield
    finally:
        release(target)
