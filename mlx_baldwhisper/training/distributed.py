"""Data-parallel training on ``mx.distributed``: one process per core, or per Mac.

Launch any training command under ``mlx.launch -n N`` (or ``--hostfile``). Every rank
builds the same global batch from the same seed and trains on its strided share of the
rows; gradients are weighted by each share's token count and averaged with
``mlx.nn.average_gradients``, so a step equals one process's step on the global batch.
Rank 0 alone writes files. A group of one (a plain run) skips every collective.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from typing import Any, Callable, TypeVar

import mlx.core as mx
import numpy as np

log = logging.getLogger("mlx_baldwhisper")
T = TypeVar("T")
# A collective that waits longer than this (seconds) means a peer is gone. Ranks wait for
# each other only while one of them writes a checkpoint or a model folder.
PEER_TIMEOUT_ENV = "MLX_BALDWHISPER_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 600.0


class PeerLostError(RuntimeError):
    """Another process of the training group stopped; this one stops too."""


@functools.lru_cache(maxsize=1)
def group() -> mx.distributed.Group:
    return mx.distributed.init()


def rank() -> int:
    return group().rank()


def size() -> int:
    return group().size()


def is_main() -> bool:
    return rank() == 0


def _lost(reason: str) -> str:
    return (f"rank {rank()} of {size()}: another training process stopped ({reason}). Stop all of "
            f"them and rerun the same launch command to resume from the last checkpoint")


def _give_up(seconds: float) -> None:
    sys.stderr.write(f"\nerror: {_lost(f'no answer from the group in {seconds:g} s')}\n")
    sys.stderr.flush()
    os._exit(1)


def collective(fn: Callable[..., T]) -> Callable[..., T]:
    """A lost peer surfaces as an error from the backend, or as a wait that never ends;
    both stop this process with one message (the wait after PEER_TIMEOUT_ENV seconds)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        seconds = float(os.environ.get(PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT))
        watchdog = threading.Timer(seconds, _give_up, (seconds,))
        watchdog.daemon = True
        watchdog.start()
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            raise PeerLostError(_lost(str(e))) from None
        finally:
            watchdog.cancel()
    return wrapper


@collective
def all_sum(x: mx.array) -> mx.array:
    out = mx.distributed.all_sum(x, group=group())
    mx.eval(out)
    return out


@collective
def average_gradients(grads: Any) -> Any:
    import mlx.nn as nn

    out = nn.average_gradients(grads, group=group())
    mx.eval(out)
    return out


def barrier() -> None:
    """Every rank reaches this point before any goes on (rank 0's files are complete)."""
    if size() > 1:
        all_sum(mx.array([1.0]))


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sum over the group (one collective for all the numbers)."""
    if size() == 1:
        return values
    return all_sum(mx.array(values, dtype=mx.float32)).tolist()


def same_everywhere(value: int, what: str) -> None:
    """Refuse to go on when ranks disagree (e.g. one cannot see the checkpoint)."""
    if size() == 1:
        return
    total, squares = sum_floats([float(value), float(value) ** 2])
    if abs(squares * size() - total * total) > 1e-6 * max(1.0, total * total):
        raise RuntimeError(f"the ranks disagree on {what} (this rank: {value}); every rank must see "
                           f"the same --out, data and cache folders (a shared folder on several hosts)")


def shard(batch: dict[str, Any], r: int, n: int) -> dict[str, Any]:
    """Rows ``r::n`` of every per-example array in ``batch``."""
    rows = len(batch["inputs"])
    return {k: v[r::n] if isinstance(v, np.ndarray) and v.ndim and len(v) == rows else v
            for k, v in batch.items()}
