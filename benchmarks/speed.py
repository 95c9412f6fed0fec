#!/usr/bin/env python
"""Decoder throughput, the paper's protocol: encode a batch of windows, then decode
exactly N tokens per item (no early stop) and report tokens/s.

    python benchmarks/speed.py --model DIR --batch 10 --tokens 256 --json

The last line printed is one JSON object (``tokens_per_s``, ``encoder_s``, ...).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import click

import mlx_baldwhisper  # noqa: F401  before mlx.core: selects the optimised BLAS on Linux


def audio_batch(batch: int, n_mels: int):
    """Real speech windows: the shared English clips if present, else the shipped sample."""
    import mlx.core as mx

    from mlx_baldwhisper.audio import N_FRAMES, N_SAMPLES, load_audio, log_mel_spectrogram, pad_or_trim
    from mlx_baldwhisper.assets import sample_audio

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "english"
    files = sorted(shared.glob("*.flac")) if shared.exists() else [sample_audio()]
    mels = []
    for i in range(batch):
        audio = pad_or_trim(load_audio(str(files[i % len(files)])), N_SAMPLES)
        mels.append(log_mel_spectrogram(audio, n_mels)[:N_FRAMES])
    return mx.stack(mels)


def measure(model, batch: int, tokens: int, repeats: int = 1) -> dict:
    import mlx.core as mx

    mel = audio_batch(batch, model.dims.n_mels).astype(model.dtype)
    mx.eval(model.embed_audio(mel[:1]))  # warm-up
    t0 = time.perf_counter()
    feats = model.embed_audio(mel)
    mx.eval(feats)
    encoder_s = time.perf_counter() - t0
    prompt = mx.array([[50258, 50259, 50359, 50363]] * batch)
    best = None
    for _ in range(repeats):
        caches = model.new_caches(batch)
        t0 = time.perf_counter()
        logits, cross, _ = model.decoder(prompt, feats, caches)
        nxt = logits[:, -1].argmax(-1)[:, None]
        mx.eval(nxt)
        for _ in range(tokens - 1):
            logits, cross, _ = model.decoder(nxt, feats, caches, cross)
            nxt = logits[:, -1].argmax(-1)[:, None]
            mx.eval(nxt)
        s = time.perf_counter() - t0
        best = s if best is None else min(best, s)
    return {"batch": batch, "tokens": tokens, "encoder_s": round(encoder_s, 4),
            "decode_s": round(best, 4), "tokens_per_s": round(batch * tokens / best, 2)}


@click.command()
@click.option("--model", "model_path", default=None, help="Model folder or name (default: embedded base).")
@click.option("--batch", default=10, show_default=True)
@click.option("--tokens", default=256, show_default=True)
@click.option("--repeats", default=1, show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Only the JSON line.")
def main(model_path, batch, tokens, repeats, dtype, as_json):
    import mlx.core as mx

    import mlx_baldwhisper
    from mlx_baldwhisper import load_model

    model = load_model(model_path, dtype=dtype)
    result = measure(model, batch, tokens, repeats)
    result.update(model=str(model_path or "base"), dtype=dtype, blas=mlx_baldwhisper.BLAS,
                  peak_memory_mb=round(mx.get_peak_memory() / 1e6, 1),
                  max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1))
    if not as_json:
        print(f"encoder {result['encoder_s']} s for {batch} windows; decoder "
              f"{result['tokens_per_s']} tokens/s ({tokens} tokens x {batch})", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
