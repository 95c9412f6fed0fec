"""Word-level timestamps from cross-attention: alignment heads + dynamic time warping.

The decoder's alignment heads attend to the audio frame being spoken. Their
attention over the forced transcript, normalised and median-filtered, forms a
token × frame cost matrix; the cheapest monotonic path through it gives, for each
token, the frame where it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from .audio import HOP_LENGTH, SAMPLE_RATE, TOKENS_PER_SECOND

SENTENCE_END = ".。!！?？"


@dataclass
class WordTiming:
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotonic alignment path through a (tokens, frames) cost matrix.

    The recurrence is evaluated one anti-diagonal at a time, so each step is a
    vectorised numpy operation rather than a Python loop over cells.
    """
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    trace = np.zeros((n + 1, m + 1), dtype=np.int8)
    for d in range(2, n + m + 1):
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        options = np.stack([acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]])
        best = options.argmin(0)
        acc[i, j] = cost[i - 1, j - 1] + options[best, np.arange(len(i))]
        trace[i, j] = best
    trace[0, :], trace[:, 0] = 2, 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = trace[i, j]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        else:
            j -= 1
    path.reverse()
    arr = np.array(path)
    return arr[:, 0], arr[:, 1]


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over a sliding window of the last axis, edges reflected."""
    if width <= 1 or x.shape[-1] <= width // 2:
        return x
    pad = width // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.median(windows, axis=-1)


def find_alignment(model, tokenizer, text_tokens: list[int], audio_features: mx.array,
                   num_frames: int, medfilt_width: int = 7) -> list[WordTiming]:
    if not text_tokens:
        return []
    sot = list(tokenizer.sot_sequence)
    tokens = sot + [tokenizer.no_timestamps] + text_tokens + [tokenizer.eot]
    logits, _, qks = model.decoder(mx.array([tokens]), audio_features, need_weights=True)
    logp = mx.softmax(logits[0, len(sot):, : tokenizer.eot].astype(mx.float32), axis=-1)
    probs = np.array(logp)[np.arange(len(text_tokens)), text_tokens]
    heads = [(l, h) for l, h in model.alignment_heads if l < len(qks)]
    w = mx.stack([qks[l][0, h] for l, h in heads])[:, :, : num_frames // 2]
    w = np.array(mx.softmax(w.astype(mx.float32), axis=-1))
    w = (w - w.mean(axis=-2, keepdims=True)) / (w.std(axis=-2, keepdims=True) + 1e-10)
    matrix = median_filter(w, medfilt_width).mean(axis=0)[len(sot):-1]
    text_idx, time_idx = dtw(-matrix)

    words, word_tokens = tokenizer.split_to_word_tokens(text_tokens + [tokenizer.eot])
    if len(word_tokens) <= 1:
        return []
    bounds = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
    jump_times = time_idx[jumps] / TOKENS_PER_SECOND
    starts, ends = jump_times[bounds[:-1]], jump_times[bounds[1:]]
    return [
        WordTiming(word, toks, float(s), float(e), float(np.mean(probs[i:j])))
        for word, toks, s, e, i, j in zip(words, word_tokens, starts, ends, bounds[:-1], bounds[1:])
    ]


def merge_punctuations(alignment: list[WordTiming], prepended: str, appended: str) -> None:
    """Attach opening punctuation to the next word and closing punctuation to the previous."""
    i = len(alignment) - 2
    j = len(alignment) - 1
    while i >= 0:
        prev, cur = alignment[i], alignment[j]
        if prev.word.startswith(" ") and prev.word.strip() in prepended:
            cur.word, cur.tokens = prev.word + cur.word, prev.tokens + cur.tokens
            prev.word, prev.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(alignment):
        prev, cur = alignment[i], alignment[j]
        if not prev.word.endswith(" ") and cur.word in appended:
            prev.word, prev.tokens = prev.word + cur.word, prev.tokens + cur.tokens
            cur.word, cur.tokens = "", []
        else:
            i = j
        j += 1


def add_word_timestamps(segments: list[dict[str, Any]], model, tokenizer, audio_features: mx.array,
                        num_frames: int, prepend: str, append: str,
                        last_speech: float = 0.0) -> None:
    """Give each segment a ``words`` list and tighten its start/end to its words."""
    per_segment = [[t for t in seg["tokens"] if t < tokenizer.eot] for seg in segments]
    alignment = find_alignment(model, tokenizer, [t for ts in per_segment for t in ts],
                               audio_features, num_frames)
    durations = np.array([w.end - w.start for w in alignment])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    for i in range(1, len(alignment)):  # cap words stretched across a pause at a sentence end
        w = alignment[i]
        if w.end - w.start > longest:
            if w.word in SENTENCE_END:
                w.end = w.start + longest
            elif alignment[i - 1].word in SENTENCE_END:
                w.start = w.end - longest
    merge_punctuations(alignment, prepend, append)

    offset = segments[0]["seek"] * HOP_LENGTH / SAMPLE_RATE
    k = 0
    for seg, toks in zip(segments, per_segment):
        taken, words = 0, []
        while k < len(alignment) and taken < len(toks):
            w = alignment[k]
            if w.word:
                words.append({"word": w.word, "start": round(offset + w.start, 2),
                              "end": round(offset + w.end, 2), "probability": w.probability})
            taken += len(w.tokens)
            k += 1
        if words:
            _fit_segment(seg, words, median, longest, last_speech)
            last_speech = seg["end"]
        seg["words"] = words


def _fit_segment(seg: dict, words: list[dict], median: float, longest: float, last_speech: float) -> None:
    first = words[0]
    gap_before = first["end"] - last_speech > median * 4
    first_too_long = first["end"] - first["start"] > longest or (
        len(words) > 1 and words[1]["end"] - first["start"] > longest * 2)
    if gap_before and first_too_long:  # a word that swallowed a pause: shorten it
        if len(words) > 1 and words[1]["end"] - words[1]["start"] > longest:
            boundary = max(words[1]["end"] / 2, words[1]["end"] - longest)
            first["end"] = words[1]["start"] = boundary
        first["start"] = max(0.0, first["end"] - longest)
    if seg["start"] < first["end"] and seg["start"] - 0.5 > first["start"]:
        first["start"] = max(0.0, min(first["end"] - median, seg["start"]))
    else:
        seg["start"] = first["start"]
    last = words[-1]
    if seg["end"] > last["start"] and seg["end"] + 0.5 < last["end"]:
        last["end"] = max(last["start"] + median, seg["end"])
    else:
        seg["end"] = last["end"]
