"""Training batches: length-bucketed, seed-controlled, and resumable to the exact batch."""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np

from ..dataset import TokenizedExample
from ..features import FeatureCache
from .packing import PackedWindow

TIMESTAMP_STREAM = 0x7473  # keeps the timestamp draws apart from the batch plan's RNG
PACK_DRAWS = 0x7064  # and the per-epoch draws of the packs shown
PROMPT_STREAM = 0x7072  # and the draws of the items conditioned on the text before them
ALTERNATE_STREAM = 0x736b  # and the draws of the clips trained on their alternate target
# The stages' default share of clips trained with timestamps: Distil-Whisper's 50 %, which
# kept its long-form ability while half the clips still train the plain text task the
# dev set is scored on.
TIMESTAMP_PROB = 0.5
# The stages' default share of packed windows trained as windows: off until measured.
PACK_PROB = 0.0
# The stages' default share of items conditioned on the previous clip's text: transcribe()
# conditions every window after the first on the text before it (openai's default), and
# a model never trained with that prompt breaks under it on long recordings (RESULTS.md).
PROMPT_PROB = 0.5


class Batcher:
    """Length-bucketed, seed-controlled batches whose position can be saved and resumed.

    Each epoch: shuffle the items, cut them into buckets of ``bucket_size``, sort each
    bucket by token length as trained, prompt included (so batches carry little padding),
    cut into batches and shuffle the batch order. The epoch's plan depends only on the RNG state at its start,
    which ``state_dict`` records, so a resumed run sees exactly the same batches.

    A share ``timestamp_prob`` of the clips is trained on its timestamped targets
    (``TokenizedExample.with_timestamps``), the rest without, so a fine-tuned model keeps
    Whisper's timestamp skill that long-form transcription relies on. The draw is per
    clip and epoch, from (seed, epoch) alone: a resumed run draws the same, and a share
    of 0 uses no randomness at all (the batches of a run without timestamps).

    A share ``prompt_prob`` of the items (drawn per item and epoch, as the timestamps)
    is conditioned on the text before it, as ``transcribe()`` conditions each window on the
    windows before it: ``<|startofprev|>`` (``sot_prev``) and the timestamped segments of the
    clips before it in the manifest, the last ``prompt_limit`` tokens at most (a pack: of
    the clips before its first).

    ``packs``: packed windows of these items (``packing.packed_windows``, a fixed plan whose
    features are cached). Each epoch, each pack is drawn (from seed and epoch) with
    probability ``pack_prob`` to train as one window, in place of its complete clips; the
    clips of the others train one by one. A pack's index in a batch is ``len(items)`` plus
    its position in ``packs``; ``self.items`` lists the clips, then the packs.
    """

    def __init__(self, items: Sequence[TokenizedExample], batch_size: int, seed: int = 0,
                 bucket_size: Optional[int] = None, shuffle: bool = True, drop_last: bool = False,
                 features: Optional[FeatureCache] = None, include_mel: bool = True,
                 timestamp_prob: float = 0.0, packs: Sequence[PackedWindow] = (),
                 pack_prob: float = 0.0, prompt_prob: float = 0.0, sot_prev: Optional[int] = None,
                 prompt_limit: int = 223, alternates: Optional[Sequence[Optional[TokenizedExample]]] = None,
                 alternate_prob: float = 0.0):
        if not items:
            raise ValueError("Batcher needs at least one item")
        if not 0.0 <= pack_prob <= 1.0:
            raise ValueError(f"pack_prob must be between 0 and 1, not {pack_prob}")
        self.n_clips, self.packs, self.pack_prob = len(items), list(packs), pack_prob
        self.items = [*items, *self.packs] if self.packs else items
        self.batch_size, self.seed = batch_size, seed
        self.bucket_size = bucket_size or batch_size * 32
        self.shuffle, self.drop_last = shuffle, drop_last
        self.features, self.include_mel = features, include_mel
        if not 0.0 <= timestamp_prob <= 1.0:
            raise ValueError(f"timestamp_prob must be between 0 and 1, not {timestamp_prob}")
        self.timestamp_prob = timestamp_prob
        if not 0.0 <= prompt_prob <= 1.0:
            raise ValueError(f"prompt_prob must be between 0 and 1, not {prompt_prob}")
        if prompt_prob and sot_prev is None:
            raise ValueError("prompt_prob needs the <|startofprev|> token id (sot_prev)")
        self.prompt_prob, self.sot_prev, self.prompt_limit = prompt_prob, sot_prev, prompt_limit
        if not 0.0 <= alternate_prob <= 1.0:
            raise ValueError(f"alternate_prob must be between 0 and 1, not {alternate_prob}")
        if alternate_prob and (alternates is None or len(alternates) != len(items)):
            raise ValueError("alternate_prob needs one alternate (or None) per item")
        self.alternates, self.alternate_prob = alternates, alternate_prob
        self._draw_cache: dict[tuple[int, int, int], np.ndarray] = {}
        self.eot = int(items[0].tokens[-1])
        self.epoch, self.index = 0, 0
        self._rng_state = np.random.default_rng(seed).bit_generator.state
        self._plan: Optional[list[np.ndarray]] = None
        self._next_state: Optional[dict] = None

    def _ensure_plan(self) -> list[np.ndarray]:
        if self._plan is None:
            rng = np.random.default_rng()
            rng.bit_generator.state = self._rng_state
            pool = self._epoch_pool()
            order = pool[rng.permutation(len(pool))] if self.shuffle else pool
            batches: list[np.ndarray] = []
            for b in range(0, len(order), self.bucket_size):
                bucket = sorted(order[b:b + self.bucket_size], key=self._trained_length)
                batches += [np.array(bucket[k:k + self.batch_size])
                            for k in range(0, len(bucket), self.batch_size)]
            if self.drop_last:
                batches = [x for x in batches if len(x) == self.batch_size]
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            self._plan, self._next_state = batches, rng.bit_generator.state
        return self._plan

    def _trained_length(self, i: int) -> int:
        """Item ``i``'s length as trained this epoch. Sorting on it puts the prompted
        items (up to 224 tokens longer) in batches of their own, instead of padding
        their unprompted batch-mates to their length."""
        n = len(self.items[i].tokens)
        if self.prompt_prob and self._draws(PROMPT_STREAM, self.prompt_prob)[i]:
            n += len(self._previous_text(i))
        return n

    def _epoch_pool(self) -> np.ndarray:
        """This epoch's items: the packs drawn to train as windows, and every clip that is
        not in one of them (all the clips, in order, when there are no packs)."""
        if not self.packs or not self.pack_prob:
            return np.arange(self.n_clips)
        rng = np.random.default_rng([int(self.seed), int(self.epoch), PACK_DRAWS])
        shown = np.flatnonzero(rng.random(len(self.packs)) < self.pack_prob)
        covered = {i for p in shown for i in self._members(p)}
        clips = [i for i in range(self.n_clips) if i not in covered]
        return np.array(clips + [self.n_clips + int(p) for p in shown], np.int64)

    def _members(self, p: int) -> tuple[int, ...]:
        pack = self.packs[p].pack
        return pack.members if pack is not None else ()

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
        trained = self._as_trained(idx)
        t = max(len(x.tokens) - 1 for x in trained)
        inputs = np.full((len(chosen), t), self.eot, np.int32)
        targets = np.full((len(chosen), t), self.eot, np.int32)
        mask = np.zeros((len(chosen), t), np.float32)
        for k, x in enumerate(trained):
            n = len(x.tokens) - 1
            inputs[k, :n], targets[k, :n], mask[k, :n] = x.inputs, x.targets, x.mask
        out = {"index": np.asarray(idx, np.int64), "inputs": inputs, "targets": targets, "mask": mask}
        if self.include_mel:
            out["mel"] = np.stack([x.mel for x in chosen]).astype(np.float32)
        if self.features is not None:
            out["features"], lengths = self.features.stack(chosen)
            if lengths is not None:  # a short audio context: clips of different lengths
                out["audio_lengths"] = np.array(lengths, np.int32)
        return out

    def _as_trained(self, idx: np.ndarray) -> list[TokenizedExample]:
        """The items of ``idx``, each with or without timestamps and the previous text as
        drawn for this epoch."""
        items = [self.items[i] for i in idx]
        if self.alternate_prob:  # e.g. the teacher's transcript in place of the human one (seqkd.py)
            draws = self._draws(ALTERNATE_STREAM, self.alternate_prob)
            items = [self.alternates[i] if i < self.n_clips and draws[i] and self.alternates[i] is not None
                     else x for i, x in zip(idx, items)]
        if self.timestamp_prob:
            draws = self._draws(TIMESTAMP_STREAM, self.timestamp_prob)
            # packs (past the clips) carry their timestamps already
            items = [x.with_timestamps() if i < self.n_clips and draws[i] else x for i, x in zip(idx, items)]
        if self.prompt_prob:
            draws = self._draws(PROMPT_STREAM, self.prompt_prob)
            items = [x.with_prompt(self._previous_text(i)) if draws[i] else x for i, x in zip(idx, items)]
        return items

    def _draws(self, stream: int, prob: float) -> np.ndarray:
        """One draw per item (clips, then packs) for this epoch, from (seed, epoch, stream)."""
        key = (int(self.seed), int(self.epoch), stream)
        if key not in self._draw_cache:
            self._draw_cache = {k: v for k, v in self._draw_cache.items() if k[:2] == key[:2]}
            self._draw_cache[key] = np.random.default_rng(list(key)).random(len(self.items)) < prob
        return self._draw_cache[key]

    def _previous_text(self, i: int) -> list[int]:
        """``<|startofprev|>`` and the timestamped segments of the clips before item ``i``
        (before a pack's first clip), as many as fit ``prompt_limit`` tokens: what
        ``transcribe()`` prompts a window with after the windows before it. None for the
        first clip, as for a recording's first window."""
        first = i if i < self.n_clips else self._members(i - self.n_clips)[0]
        if first == 0:
            return []
        text: list[int] = []
        j = first - 1
        while j >= 0 and len(text) < self.prompt_limit:
            text = [int(t) for t in self.items[j].segment_tokens] + text
            j -= 1
        return [int(self.sot_prev), *text[len(text) - min(len(text), self.prompt_limit):]]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: epoch, batch index and the epoch's starting RNG state."""
        return {"epoch": self.epoch, "index": self.index, "rng_state": self._rng_state,
                "seed": self.seed, "n_items": self.n_clips, "batch_size": self.batch_size,
                "n_packs": len(self.packs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (state["n_items"], state.get("n_packs", 0), state["batch_size"])
        if saved != (self.n_clips, len(self.packs), self.batch_size):
            raise ValueError(
                f"batcher state is for {saved[0]} items and {saved[1]} packs in batches of {saved[2]}, "
                f"not {self.n_clips} and {len(self.packs)} in batches of {self.batch_size}: "
                f"batches would differ")
        self.epoch, self.index, self.seed = int(state["epoch"]), int(state["index"]), state["seed"]
        self._rng_state, self._plan = state["rng_state"], None
