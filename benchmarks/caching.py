#!/usr/bin/env python
"""What caching encoder features costs over 30-s windows vs a short audio context.

    python benchmarks/caching.py --train ../shared/data/hausa/train.tsv --clips 64 --rounds 2

The first --clips clips of the manifest are prepared once (decoding, log-Mel); then the
feature cache is filled from empty over each context in turn, alternating (A B A B ...)
so that a changing load on the machine hits both alike. Reported per context: seconds
per clip (median over rounds), the positions encoded per clip, and the bytes cached.
With --packs, each round then also caches the packed windows of the same clips
(training/packing.py, the plan of seed 0) into that cache: their time (composing the
log-Mels and encoding) is reported per training clip, beside the clips' own.
The last line printed is JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import click

import mlx_baldwhisper  # noqa: F401  before mlx.core: selects the optimised BLAS on Linux


@click.command()
@click.option("--train", required=True, help="A manifest; its first --clips clips are used.")
@click.option("--language", default="ha", show_default=True)
@click.option("--clips", default=64, show_default=True)
@click.option("--rounds", default=2, show_default=True)
@click.option("--contexts", default="full,dynamic", show_default=True)
@click.option("--model", default=None, help="Model (default: the embedded whisper-base).")
@click.option("--packs", is_flag=True, help="Also time caching the clips' packed windows.")
def main(train, language, clips, rounds, contexts, model, packs):
    from mlx_baldwhisper import load_model
    from mlx_baldwhisper.audio_context import AudioContext
    from mlx_baldwhisper.dataset import prepare, read_manifest
    from mlx_baldwhisper.decoding import tokenizer_for
    from mlx_baldwhisper.features import FeatureCache, encoder_fingerprint
    from mlx_baldwhisper.training.common import training_packs

    whisper = load_model(model)
    items, _ = prepare(read_manifest(train, language=language)[:clips],
                       tokenizer_for(whisper, language), whisper.dims.n_mels, progress=False)
    encoder = encoder_fingerprint(whisper)
    names = [c.strip() for c in contexts.split(",")]
    times: dict[str, list[float]] = {c: [] for c in names}
    pack_times: dict[str, list[float]] = {c: [] for c in names}
    sizes: dict[str, int] = {}
    windows = []
    for _ in range(rounds):
        for c in names:
            ctx = AudioContext.parse(c)
            with tempfile.TemporaryDirectory() as d:
                cache = FeatureCache(encoder, d, context=ctx)
                t0 = time.perf_counter()
                cache.compute(whisper, items, batch_size=4, progress=False)
                times[c].append((time.perf_counter() - t0) / len(items))
                if packs:
                    t0 = time.perf_counter()
                    windows = training_packs(whisper, items, 0, 1.0, [cache])
                    pack_times[c].append((time.perf_counter() - t0) / len(items))
                sizes[c] = cache.disk_usage()[1]
    ctx_n = whisper.dims.n_audio_ctx
    rows = []
    for c in names:
        ctx = AudioContext.parse(c)
        positions = [FeatureCache("x", context=ctx).positions(x, ctx_n) for x in items]
        rows.append({"context": c, "s_per_clip": round(statistics.median(times[c]), 3),
                     "all_s_per_clip": [round(t, 3) for t in times[c]],
                     **({"packs_s_per_clip": round(statistics.median(pack_times[c]), 3),
                         "all_packs_s_per_clip": [round(t, 3) for t in pack_times[c]],
                         "pack_positions": [FeatureCache("x", context=ctx).positions(w, ctx_n)
                                            for w in windows]} if packs else {}),
                     "mean_positions": round(sum(positions) / len(positions), 1),
                     "cache_mb": round(sizes[c] / 1e6, 1)})
    mean_s = sum(x.duration for x in items) / len(items)
    print("| context | s per clip | positions per clip (mean) | cache MB |"
          + (" packs: s per clip |" if packs else ""))
    print("|---|---|---|---|" + ("---|" if packs else ""))
    for r in rows:
        print(f"| {r['context']} | {r['s_per_clip']} | {r['mean_positions']} | {r['cache_mb']} |"
              + (f" {r['packs_s_per_clip']} |" if packs else ""))
    extra = {"packs": len(windows), "cut_off": sum(w.pack.cut_off is not None for w in windows),
             "packed_clips": sum(len(w.pack.members) for w in windows)} if packs else {}
    print(json.dumps({"clips": len(items), "mean_clip_s": round(mean_s, 2), **extra, "rows": rows,
                      "load_avg": os.getloadavg()}))


if __name__ == "__main__":
    main()
