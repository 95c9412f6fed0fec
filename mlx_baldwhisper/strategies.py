"""How each step's tokens are chosen: greedy or sampled (:class:`Sampling`), or beam search.

A strategy sees one step's logits (after the logit rules) and the sequences so far; the
decoding loop (decoding.Decoder) owns the model and the length limit. At the end a
strategy gives, per audio, its candidates as (text tokens, summed log-probability);
the caller ranks them.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import numpy as np

from .backends.cpu.ops import log_softmax

Candidates = list[tuple[list[int], float]]


class Strategy(Protocol):
    def update(self, tokens: list[list[int]], logits: np.ndarray) -> tuple[list[list[int]], bool]:
        """The sequences after this step's choice, and whether every audio is done."""
        ...

    def finalize(self, tokens: list[list[int]]) -> list[Candidates]:
        ...


def _text(seq: tuple[int, ...] | list[int], sample_begin: int, eot: int) -> list[int]:
    body = list(seq[sample_begin:])
    return body[: body.index(eot)] if eot in body else body


class Sampling:
    """Greedy at temperature 0, else sampled; ``group`` independent sequences per audio
    (best_of). A finished sequence stops growing (it keeps its <|endoftext|>)."""

    def __init__(self, temperature: float, eot: int, n_audio: int, group: int,
                 sample_begin: int, rng: np.random.Generator):
        self.temperature, self.eot, self.n_audio, self.group = temperature, eot, n_audio, group
        self.sample_begin, self.rng = sample_begin, rng
        self.sum_lp = np.zeros(n_audio * group)
        self.done = np.zeros(n_audio * group, bool)

    def update(self, tokens: list[list[int]], logits: np.ndarray) -> tuple[list[list[int]], bool]:
        lp = log_softmax(logits)
        if self.temperature == 0:
            nxt = logits.argmax(-1)
        else:
            p = np.exp(log_softmax(logits / self.temperature))
            nxt = np.array([self.rng.choice(p.shape[1], p=row / row.sum()) for row in p])
        for k, t in enumerate(nxt):
            if self.done[k]:
                continue
            self.sum_lp[k] += lp[k, t]
            tokens[k].append(int(t))
            self.done[k] = t == self.eot
        return tokens, bool(self.done.all())

    def finalize(self, tokens: list[list[int]]) -> list[Candidates]:
        g = self.group
        return [[(_text(tokens[k], self.sample_begin, self.eot), float(self.sum_lp[k]))
                 for k in range(i * g, (i + 1) * g)] for i in range(self.n_audio)]


class BeamSearch:
    """Beam search with patience (arXiv:2204.05424).

    Each audio keeps ``beam_size`` live hypotheses; one that emits <|endoftext|> is set
    aside as finished. An audio is done once it holds ``round(beam_size * patience)``
    finished hypotheses. ``reorder`` is told which rows survive each step (the decoding
    state's history follows them).
    """

    def __init__(self, beam_size: int, eot: int, n_audio: int, sample_begin: int,
                 reorder: Callable[[np.ndarray], None], patience: Optional[float] = None):
        self.k, self.eot, self.n_audio, self.sample_begin = beam_size, eot, n_audio, sample_begin
        self.reorder = reorder
        self.max_finished = max(1, round(beam_size * (patience or 1.0)))
        self.sum_lp = np.zeros(n_audio * beam_size)
        self.finished: list[dict[tuple[int, ...], float]] = [{} for _ in range(n_audio)]

    def update(self, tokens: list[list[int]], logits: np.ndarray) -> tuple[list[list[int]], bool]:
        k, eot = self.k, self.eot
        lp = log_softmax(logits)
        new_tokens, new_lp, source = [], [], []
        for a in range(self.n_audio):
            rows = range(a * k, (a + 1) * k)
            if len(self.finished[a]) >= self.max_finished:  # done: carry the beams unchanged
                for r in rows:
                    new_tokens.append(tokens[r]); new_lp.append(self.sum_lp[r]); source.append(r)
                continue
            scores: dict[tuple[int, ...], tuple[float, int]] = {}
            for r in rows:
                for t in np.argpartition(-lp[r], k)[: k + 1]:
                    seq = tuple(tokens[r]) + (int(t),)
                    score = self.sum_lp[r] + lp[r, t]
                    if seq not in scores or scores[seq][0] < score:
                        scores[seq] = (score, r)
            kept = 0
            for seq, (score, r) in sorted(scores.items(), key=lambda kv: -kv[1][0]):
                if seq[-1] == eot:
                    if len(self.finished[a]) < self.max_finished:
                        self.finished[a][seq] = score
                elif kept < k:
                    new_tokens.append(list(seq)); new_lp.append(score); source.append(r)
                    kept += 1
                if kept == k:  # finished hypotheses ranked below the beams are not kept
                    break
            while kept < k:  # fewer live candidates than beams (rare): repeat the best
                new_tokens.append(list(new_tokens[-1])); new_lp.append(new_lp[-1])
                source.append(source[-1])
                kept += 1
        self.reorder(np.array(source))
        self.sum_lp = np.array(new_lp)
        return new_tokens, all(len(f) >= self.max_finished for f in self.finished)

    def finalize(self, tokens: list[list[int]]) -> list[Candidates]:
        out = []
        for a in range(self.n_audio):
            fin = dict(self.finished[a])
            live = sorted(range(a * self.k, (a + 1) * self.k), key=lambda r: -self.sum_lp[r])
            for r in live:  # audio cut off by the length limit: use the best live beams
                if len(fin) >= self.max_finished:
                    break
                fin.setdefault(tuple(tokens[r]), float(self.sum_lp[r]))
            out.append([(_text(seq, self.sample_begin, self.eot), float(score))
                        for seq, score in fin.items()])
        return out
