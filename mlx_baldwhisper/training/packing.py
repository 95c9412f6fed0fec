"""Packed windows: consecutive short clips joined into one <= 30-s window, one timestamped
segment per clip, so training sees windows that look like long-form ones.

Fine-tuning corpora are short clips; long-form transcription decodes 30-s windows of a
recording that hold several segments, the last one often cut off at the window's edge.
A pack places consecutive clips (manifest order) one after the other with short gaps of
silence, and its target gives each clip's segment. When the window runs on into the next
clip, that clip is cut at the 30-s edge and, as in openai's long-form data, only its start
is in the target (``dataset.timestamp_target``): the model learns to stop at the last
complete segment and to say where the cut-off one begins, which is where the seeking loop
resumes.

The plan is fixed by the seed, once per training run, not drawn per epoch: the encoder
output of a window is not made of its clips' outputs (attention spans the window), so each
distinct pack costs one encoder pass. A fixed plan is encoded once and then served by the
feature cache to every epoch and to every stage with the same seed.

The window's log-Mel is composed from the clips' own log-Mels, which equals the log-Mel of
the joined audio: each clip starts on a frame, its frames past its end already see silence,
and Whisper's floor (the window's maximum minus 8 in log10, i.e. minus 2 after scaling) is
applied again over the whole window. Only three frames at each clip's start differ (their
STFT windows saw the clip's reflected start, or the silence after the previous clip,
instead of both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..audio import N_FRAMES, N_SAMPLES, SAMPLE_RATE
from ..dataset import TIME_PRECISION, TokenizedExample, timestamp_target

WINDOW_STEPS = round(N_SAMPLES / SAMPLE_RATE / TIME_PRECISION)  # 1500 timestamp steps in 30 s
STEP_FRAMES = N_FRAMES // WINDOW_STEPS  # 2 mel frames per 0.02-s step
GAP_STEPS = (5, 50)  # silence between clips: 0.1-1.0 s, in 0.02-s steps
# Share of packs whose window runs on into the next clip, cut at the 30-s edge, as in the
# middle of a recording; the rest end after their last clip, as a recording's last window.
CUT_PROB = 0.5
MIN_CUT_STEPS = 25  # a cut-off clip keeps at least 0.5 s in the window
# Segment tokens + eot per window: decoding's sample_len (n_text_ctx // 2), the most one
# window can emit, and prepare()'s limit for a clip.
MAX_TOKENS = 224
PACK_STREAM = 0x706B  # keeps the plan's draws apart from the batches' RNG streams


@dataclass(frozen=True)
class Pack:
    """One window's plan: clips ``members`` (item indices, consecutive) starting at
    ``starts`` (0.02-s steps), then possibly the next clip ``cut_off`` starting at
    ``cut_start``, cut at the 30-s edge; its text is not in the target."""

    members: tuple[int, ...]
    starts: tuple[int, ...]
    cut_off: Optional[int] = None
    cut_start: Optional[int] = None


@dataclass
class PackedWindow(TokenizedExample):
    """A packed window as a training item: its composed log-Mel and timestamped targets
    (``tokens``; ``with_timestamps`` is itself), plus the ``pack`` it was built from."""

    pack: Optional[Pack] = None


@dataclass(frozen=True)
class _Clip:
    """What a pack needs of a clip, read back from its one-segment timestamped targets."""

    prompt: tuple[int, ...]  # without <|notimestamps|>
    timestamp_begin: int
    eot: int
    text: tuple[int, ...]
    end: int  # where its speech ends, in steps from its start
    length: int  # its audio, in steps (at least ``end``)


def _clip(item: TokenizedExample) -> Optional[_Clip]:
    stamped = item.timestamp_tokens
    if stamped is None:
        return None
    p = item.prompt_length - 1  # the position of <|0.00|>
    tb = int(stamped[p])
    end = int(stamped[-2]) - tb
    if end <= 0:  # no segment: a window without speech (silence.py) is not packed
        return None
    length = max(end, math.ceil(item.duration / TIME_PRECISION - 1e-9))
    return _Clip(tuple(int(t) for t in stamped[:p]), tb, int(stamped[-1]),
                 tuple(int(t) for t in stamped[p + 1:-2]), end, length)


def _same_prompt(clip: _Clip, first: _Clip) -> bool:
    return (clip.prompt, clip.eot) == (first.prompt, first.eot)


def plan_packs(items: Sequence[TokenizedExample], seed: int) -> list[Pack]:
    """Cut the clips, in order, into packs: each takes consecutive clips (same prompt, with
    timestamped targets) while their speech ends within 30 s and their tokens fit
    MAX_TOKENS, with a gap drawn from GAP_STEPS after each. With probability CUT_PROB the
    next clip is added cut off when its speech crosses the 30-s edge; the next pack starts
    at it (whole), as the seeking loop would. A pack of one clip without a cut is no pack."""
    rng = np.random.default_rng([int(seed), PACK_STREAM])
    clips = [_clip(x) for x in items]
    packs: list[Pack] = []
    i = 0
    while i < len(items):
        first = clips[i]
        if first is None:
            i += 1
            continue
        members: list[int] = []
        starts: list[int] = []
        t, used, j = 0, 2, i  # used: eot, and room for a cut-off segment's start
        nxt: Optional[_Clip] = first
        while nxt is not None and _same_prompt(nxt, first):
            if t + nxt.end > WINDOW_STEPS or used + len(nxt.text) + 2 > MAX_TOKENS:
                break
            members.append(j)
            starts.append(t)
            used += len(nxt.text) + 2
            t += nxt.length + int(rng.integers(GAP_STEPS[0], GAP_STEPS[1] + 1))
            j += 1
            nxt = clips[j] if j < len(items) else None
        cut = None
        if (nxt is not None and _same_prompt(nxt, first) and t + nxt.end > WINDOW_STEPS
                and t <= WINDOW_STEPS - MIN_CUT_STEPS and rng.random() < CUT_PROB):
            cut = j
        if len(members) > 1 or cut is not None:
            packs.append(Pack(tuple(members), tuple(starts), cut, t if cut is not None else None))
        i = max(j, i + 1)
    return packs


def compose_mel(mels: Sequence[np.ndarray], starts: Sequence[int]) -> np.ndarray:
    """The ``(N_FRAMES, n_mels)`` log-Mel of a 30-s window holding clips at ``starts``
    (0.02-s steps, in order) with silence between them. Each clip's frames run on to the
    next clip's start (to the window's edge for the last one): past its end they hold the
    tail of its last STFT window, then silence."""
    out = np.empty((N_FRAMES, mels[0].shape[-1]), np.float32)
    bounds = [min(s * STEP_FRAMES, N_FRAMES) for s in starts] + [N_FRAMES]
    for mel, a, b in zip(mels, bounds, bounds[1:]):
        out[a:b] = mel[:b - a]
    return np.maximum(out, out.max() - 2.0).astype(mels[0].dtype)


def build_window(items: Sequence[TokenizedExample], pack: Pack) -> PackedWindow:
    """The training item of ``pack``: composed log-Mel and one segment per complete clip.
    Its duration is where its audio ends: the 30-s edge when cut, else its last clip's end."""
    placed = list(zip(pack.members, pack.starts))
    if pack.cut_off is not None and pack.cut_start is not None:
        placed.append((pack.cut_off, pack.cut_start))
    clips = {i: _clip(items[i]) for i, _ in placed}
    known = {i: c for i, c in clips.items() if c is not None}
    if len(known) < len(clips):
        raise ValueError("a packed clip has no timestamped targets")
    first = known[pack.members[0]]
    segments = [(s, known[i].text, s + known[i].end) for i, s in zip(pack.members, pack.starts)]
    tokens = timestamp_target(first.prompt, first.timestamp_begin, first.eot, segments, pack.cut_start)
    last, start = placed[-1]
    end = WINDOW_STEPS if pack.cut_off is not None else min(WINDOW_STEPS, start + known[last].length)
    mel = compose_mel([items[i].mel for i, _ in placed], [s for _, s in placed])
    name = "pack[" + " + ".join(items[i].name for i, _ in placed) + ("]" if pack.cut_off is None else " (cut)]")
    return PackedWindow(name, " ".join(items[i].text.strip() for i in pack.members),
                        items[pack.members[0]].language, mel, np.array(tokens, np.int32),
                        len(first.prompt), end * TIME_PRECISION, pack=pack)


def packed_windows(items: Sequence[TokenizedExample], seed: int) -> list[PackedWindow]:
    """The fixed plan of ``seed`` (:func:`plan_packs`), built."""
    return [build_window(items, p) for p in plan_packs(items, seed)]
