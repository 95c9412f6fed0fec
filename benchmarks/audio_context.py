#!/usr/bin/env python
"""Accuracy, time and edge cases of one model under several audio contexts.

    python benchmarks/audio_context.py --model runs/ha/final-ctx --data ../shared/data/hausa/dev.tsv \
        --language ha --limit 100 --contexts full,dynamic:16,dynamic:32,dynamic:64,dynamic:128 \
        --edge --json out.json

For each context: dev WER/CER of greedy decoding without timestamps (``evaluate``, batch
--batch-size) and its wall time. With --edge, for the first and last context: 10 s of
silence (the text must be empty), one recording just under 30 s and one of about
--long-seconds, both made of consecutive dev clips and transcribed by ``transcribe()``
with its defaults (timestamps, fallback, conditioning), scored like the dev clips.
Each context's transcripts are also scored against the first context's, or with
--reference-model against that model's at full context ("vs reference"): how far a short
context moves the model from what it (or the model it was taught from) writes at full
context. That is what the audio-context stage trains for, and what can still be read when
the human references are out of the model's reach (stock whisper-base on a new language).
The last line printed is JSON.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click
import numpy as np

import mlx_baldwhisper  # noqa: F401  before mlx.core: selects the optimised BLAS on Linux


def _edge_cases(model, items, language, context, long_seconds):
    from mlx_baldwhisper.evaluate import error_counts, error_rates, join_clips, normalize
    from mlx_baldwhisper.transcribe import transcribe

    def score(recording):
        t0 = time.perf_counter()
        r = transcribe(recording.samples, path_or_hf_repo=model, language=language,
                       audio_context=context, verbose=None)
        rates = error_rates(error_counts([normalize(recording.text)], [normalize(r["text"])]))
        return {"seconds_audio": round(recording.seconds, 1), "wer": rates["wer"], "cer": rates["cer"],
                "wall_s": round(time.perf_counter() - t0, 1), "text": r["text"][:200]}

    t0 = time.perf_counter()
    silent = transcribe(np.zeros(10 * 16000, np.float32), path_or_hf_repo=model, language=language,
                        audio_context=context, verbose=None)
    out = {"silence_10s": {"text": silent["text"], "wall_s": round(time.perf_counter() - t0, 1)}}
    near = [r for r in join_clips(items, 25.0) if r.seconds <= 30.0]
    if near:
        out["near_30s"] = score(max(near, key=lambda r: r.seconds))
    longs = join_clips(items, long_seconds)
    if longs:
        out["long"] = score(longs[0])
    return out


@click.command()
@click.option("--model", required=True, help="Model folder (or embedded name).")
@click.option("--data", "manifest", required=True, help="Dev manifest.")
@click.option("--language", default=None)
@click.option("--limit", default=100, show_default=True, type=int, help="Dev clips scored.")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--contexts", default="full,dynamic", show_default=True,
              help="Comma-separated audio contexts (full, dynamic, dynamic:MARGIN, N).")
@click.option("--edge/--no-edge", default=False, help="Also the silence, near-30-s and long cases.")
@click.option("--long-seconds", default=180.0, show_default=True)
@click.option("--json", "json_path", default=None)
@click.option("--reference-model", default=None,
              help="Score the transcripts against this model's at full context (default: the "
                   "first context's of --model).")
def main(model, manifest, language, limit, batch_size, contexts, edge, long_seconds, json_path,
         reference_model):
    from mlx_baldwhisper import load_model
    from mlx_baldwhisper.dataset import read_manifest
    from mlx_baldwhisper.decoding import DecodingOptions
    from mlx_baldwhisper.evaluate import error_counts, error_rates, evaluate

    whisper = load_model(model)
    items = read_manifest(manifest, language=language)
    options = DecodingOptions(without_timestamps=True, temperature=0.0, sample_len=128)
    names = [c.strip() for c in contexts.split(",") if c.strip()]
    evaluate(whisper, items[:2], language=language, options=options, progress=False)  # warm-up
    rows, reference = [], None
    if reference_model:
        ref = evaluate(load_model(reference_model), items, language=language, batch_size=batch_size,
                       limit=limit, options=options, audio_context="full", progress=False)
        reference = [u["hypothesis_norm"] for u in ref["rows"]]
    for c in names:
        r = evaluate(whisper, items, language=language, batch_size=batch_size, limit=limit,
                     options=options, audio_context=c, progress=False)
        hyps = [u["hypothesis_norm"] for u in r["rows"]]
        reference = reference or hyps
        pairs = [(f, h) for f, h in zip(reference, hyps) if f]  # an empty reference scores nothing
        agree = error_rates(error_counts([f for f, _ in pairs], [h for _, h in pairs]))
        row = {"context": c, "wer": round(r["wer"], 4), "cer": round(r["cer"], 4), "n": r["n"],
               "eval_s": round(r["seconds"], 1), "wer_vs_reference": round(agree["wer"], 4),
               "cer_vs_reference": round(agree["cer"], 4)}
        if edge and c in (names[0], names[-1]):
            row["edge"] = _edge_cases(whisper, items, language, c, long_seconds)
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
    against = f"{reference_model} at full" if reference_model else names[0]
    print(f"| audio context | dev WER % | dev CER % | WER / CER % vs {against} | clips | eval wall (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {100 * r['wer']:.2f} | {100 * r['cer']:.2f} | "
              f"{100 * r['wer_vs_reference']:.2f} / {100 * r['cer_vs_reference']:.2f} | {r['n']} | {r['eval_s']} |")
    result = {"model": model, "manifest": manifest, "limit": limit, "rows": rows,
              "load_avg": os.getloadavg()}
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
