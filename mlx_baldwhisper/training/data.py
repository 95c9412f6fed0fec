"""Training batches: length-bucketed, seed-controlled, and resumable to the exact batch."""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np

from ..dataset import TokenizedExample
from ..features import FeatureCache


class Batcher:
    """Length-bucketed, seed-controlled batches whose position can be saved and resumed.

    Each epoch: shuffle the items, cut them into buckets of ``bucket_size``, sort each
    bucket by token length (so batches carry little padding), cut into batches and
    shuffle the batch order. The epoch's plan depends only on the RNG state at its start,
    which ``state_dict`` records, so a resumed run sees exactly the same batches.
    """

    def __init__(self, items: Sequence[TokenizedExample], batch_size: int, seed: int = 0,
                 bucket_size: Optional[int] = None, shuffle: bool = True, drop_last: bool = False,
                 features: Optional[FeatureCache] = None, include_mel: bool = True):
        if not items:
            raise ValueError("Batcher needs at least one item")
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.bucket_size = bucket_size or batch_size * 32
        self.shuffle, self.drop_last = shuffle, drop_last
        self.features, self.include_mel = features, include_mel
        self.eot = int(items[0].tokens[-1])
        self.epoch, self.index = 0, 0
        self._rng_state = np.random.default_rng(seed).bit_generator.state
        self._plan: Optional[list[np.ndarray]] = None
        self._next_state: Optional[dict] = None

    def _ensure_plan(self) -> list[np.ndarray]:
        if self._plan is None:
            rng = np.random.default_rng()
            rng.bit_generator.state = self._rng_state
            n = len(self.items)
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            batches: list[np.ndarray] = []
            for b in range(0, n, self.bucket_size):
                bucket = sorted(order[b:b + self.bucket_size], key=lambda i: len(self.items[i].tokens))
                batches += [np.array(bucket[k:k + self.batch_size])
                            for k in range(0, len(bucket), self.batch_size)]
            if self.drop_last:
                batches = [x for x in batches if len(x) == self.batch_size]
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            self._plan, self._next_state = batches, rng.bit_generator.state
        return self._plan

    def _advance_epoch(self) -> None:
        self._ensure_plan()
        self.epoch, self.index = self.epoch + 1, 0
        self._rng_state, self._plan = self._next_state, None

    def __len__(self) -> int:
        return len(self._ensure_plan())

    def next_batch(self) -> dict[str, np.ndarray]:
        """The next batch, rolling into the next epoch when this one is used up."""
        if self.index >= len(self._ensure_plan()):
            self._advance_epoch()
        idx = self._ensure_plan()[self.index]
        self.index += 1
        return self.collate(idx)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """The remaining batches of the current epoch (a finished epoch rolls over first)."""
        if self.index >= len(self._ensure_plan()):
            self._advance_epoch()
        epoch = self.epoch
        while self.epoch == epoch and self.index < len(self._ensure_plan()):
            yield self.next_batch()

    def collate(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Pad inputs with eot, targets with eot under a zero mask."""
        chosen = [self.items[i] for i in idx]
        t = max(len(x.tokens) - 1 for x in chosen)
        inputs = np.full((len(chosen), t), self.eot, np.int32)
        targets = np.full((len(chosen), t), self.eot, np.int32)
        mask = np.zeros((len(chosen), t), np.float32)
        for k, x in enumerate(chosen):
            n = len(x.tokens) - 1
            inputs[k, :n], targets[k, :n], mask[k, :n] = x.inputs, x.targets, x.mask
        out = {"index": np.asarray(idx, np.int64), "inputs": inputs, "targets": targets, "mask": mask}
        if self.include_mel:
            out["mel"] = np.stack([x.mel for x in chosen]).astype(np.float32)
        if self.features is not None:
            out["features"] = self.features.stack(chosen)
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: epoch, batch index and the epoch's starting RNG state."""
        return {"epoch": self.epoch, "index": self.index, "rng_state": self._rng_state,
                "seed": self.seed, "n_items": len(self.items), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n_items"] != len(self.items) or state["batch_size"] != self.batch_size:
            raise ValueError(
                f"batcher state is for {state['n_items']} items in batches of {state['batch_size']}, "
                f"not {len(self.items)} in batches of {self.batch_size}: batches would differ")
        self.epoch, self.index, self.seed = int(state["epoch"]), int(state["index"]), state["seed"]
        self._rng_state, self._plan = state["rng_state"], None
