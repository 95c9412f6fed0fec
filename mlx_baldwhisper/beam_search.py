"""Beam search over the decoder, with patience (arXiv:2204.05424) and a length penalty.

Each audio keeps ``beam_size`` live hypotheses; a hypothesis that emits <|endoftext|>
is set aside as finished. An audio is done once it holds ``round(beam_size *
patience)`` finished hypotheses; the caller ranks them with the length penalty.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .decoding import log_softmax


def beam_search(dec, audio_features: mx.array, tokens: list[list[int]], n_audio: int):
    k = dec.options.beam_size
    max_finished = max(1, round(k * (dec.options.patience or 1.0)))
    eot = dec.tk.eot
    caches = dec.model.new_caches(len(tokens))
    cross = None
    sum_lp = np.zeros(len(tokens))
    finished: list[dict[tuple[int, ...], float]] = [{} for _ in range(n_audio)]
    no_speech = None
    for step in range(dec.sample_len):
        logits, cross, ns = dec.step(audio_features, tokens, caches, cross, first=(step == 0))
        if ns is not None:
            no_speech = ns
        lp = log_softmax(logits)
        new_tokens, new_lp, source = [], [], []
        for a in range(n_audio):
            rows = range(a * k, (a + 1) * k)
            if len(finished[a]) >= max_finished:  # done: carry the beams along unchanged
                for r in rows:
                    new_tokens.append(tokens[r]); new_lp.append(sum_lp[r]); source.append(r)
                continue
            scores: dict[tuple[int, ...], tuple[float, int]] = {}
            for r in rows:
                for t in np.argpartition(-lp[r], k)[: k + 1]:
                    seq = tuple(tokens[r]) + (int(t),)
                    score = sum_lp[r] + lp[r, t]
                    if seq not in scores or scores[seq][0] < score:
                        scores[seq] = (score, r)
            kept = 0
            for seq, (score, r) in sorted(scores.items(), key=lambda kv: -kv[1][0]):
                if seq[-1] == eot:
                    if len(finished[a]) < max_finished:
                        finished[a][seq] = score
                elif kept < k:
                    new_tokens.append(list(seq)); new_lp.append(score); source.append(r)
                    kept += 1
                if kept == k:  # finished hypotheses ranked below the beams are not kept
                    break
            while kept < k:  # fewer live candidates than beams (rare): repeat the best
                new_tokens.append(list(new_tokens[-1])); new_lp.append(new_lp[-1]); source.append(source[-1])
                kept += 1
        index = mx.array(source)
        for c in caches:
            c.reorder(index)
        tokens, sum_lp = new_tokens, np.array(new_lp)
        if all(len(f) >= max_finished for f in finished) or len(tokens[0]) >= dec.n_ctx:
            break
    out = []
    for a in range(n_audio):
        fin = dict(finished[a])
        live = sorted(range(a * k, (a + 1) * k), key=lambda r: -sum_lp[r])
        for r in live:  # audio cut off by the length limit: use the best live beams
            if len(fin) >= max_finished:
                break
            fin.setdefault(tuple(tokens[r]), float(sum_lp[r]))
        cands = []
        for seq, score in fin.items():
            body = list(seq[dec.sample_begin:])
            if eot in body:
                body = body[: body.index(eot)]
            cands.append((body, float(score)))
        out.append(cands)
    return out, no_speech
