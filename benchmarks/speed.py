#!/usr/bin/env python
"""Decoder throughput, the paper's protocol: encode a batch of windows, then decode
exactly N tokens per item (no early stop) and report tokens/s.

    python benchmarks/speed.py --model DIR --batch 10 --tokens 256 --json

The last line printed is one JSON object (``tokens_per_s``, ``encoder_s``, ...).
``tokens_per_cpu_s`` divides by the process CPU time instead of wall time: on a machine
shared with other jobs it is the steadier figure (this process uses about one core).
``--encoder-windows N`` encodes N distinct windows and repeats them up to the batch
(the decoder cost does not depend on the audio); ``0`` decodes random features and
times no encoder (quantized and half-precision encoders are very slow on MLX's CPU
backend).
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Optional

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


class _CachedDecoder:
    """An older checkout's decoding state: the decoder with its KV caches."""

    def __init__(self, model, batch: int):
        self.model, self.caches, self.cross = model, model.new_caches(batch), None

    def logits(self, tokens, feats):
        logits, self.cross, _ = self.model.decoder(tokens, feats, self.caches, self.cross)
        return logits


def decoding(model, batch: int):
    """The decoding state the package's own decoding uses (backends.decoding)."""
    try:
        from mlx_baldwhisper.backends import decoding
    except ImportError:  # an older checkout, for before/after runs
        import contextlib
        return contextlib.nullcontext(_CachedDecoder(model, batch))
    return decoding(model, batch)


def measure(model, batch: int, tokens: int, repeats: int = 1,
            encoder_windows: Optional[int] = None) -> dict:
    import mlx.core as mx

    n_enc = min(batch, batch if encoder_windows is None else encoder_windows)
    if n_enc == 0:  # decoder only: random features (a fixed-length decode costs the same)
        d = model.dims
        feats = (mx.random.normal((1, d.n_audio_ctx, d.n_audio_state), key=mx.random.key(0))
                 .astype(model.dtype))
        encoder_s, n_enc = None, 0
    else:
        mel = audio_batch(n_enc, model.dims.n_mels).astype(model.dtype)
        mx.eval(model.embed_audio(mel[:1]))  # warm-up
        t0 = time.perf_counter()
        feats = model.embed_audio(mel)
        mx.eval(feats)
        encoder_s = time.perf_counter() - t0
    if feats.shape[0] < batch:
        feats = mx.concatenate([feats] * (-(-batch // feats.shape[0])))[:batch]
        mx.eval(feats)
    prompt = mx.array([[50258, 50259, 50359, 50363]] * batch)
    best = best_cpu = None
    for _ in range(repeats):
        with decoding(model, batch) as inference:
            t0, c0 = time.perf_counter(), time.process_time()
            nxt = prompt
            for _ in range(tokens):
                nxt = inference.logits(nxt, feats)[:, -1].argmax(-1)[:, None]
                mx.eval(nxt)
            s, c = time.perf_counter() - t0, time.process_time() - c0
        best = s if best is None else min(best, s)
        best_cpu = c if best_cpu is None else min(best_cpu, c)
    return {"batch": batch, "tokens": tokens, "encoder_windows": n_enc,
            "encoder_s": None if encoder_s is None else round(encoder_s, 4),
            "encoder_s_per_window": None if encoder_s is None else round(encoder_s / n_enc, 4),
            "decode_s": round(best, 4), "tokens_per_s": round(batch * tokens / best, 2),
            "decode_cpu_s": round(best_cpu, 4),
            "tokens_per_cpu_s": round(batch * tokens / best_cpu, 2)}


@click.command()
@click.option("--model", "model_path", default=None, help="Model folder or name (default: embedded base).")
@click.option("--batch", default=10, show_default=True)
@click.option("--tokens", default=256, show_default=True)
@click.option("--repeats", default=1, show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--encoder-windows", default=None, type=int,
              help="Distinct windows to encode (default: the batch), repeated up to the batch; "
                   "0 = random features, no encoder timing.")
@click.option("--packed", is_flag=True,
              help="Keep a quantized model's packed weights (MLX quantized kernels) instead of "
                   "the Linux CPU default of unpacking them at load.")
@click.option("--json", "as_json", is_flag=True, help="Only the JSON line.")
def main(model_path, batch, tokens, repeats, dtype, encoder_windows, packed, as_json):
    import mlx.core as mx

    import mlx_baldwhisper
    from mlx_baldwhisper import load_model

    model = load_model(model_path, dtype=dtype, dequantize=False if packed else None)
    ops = "none"
    for name in ("mlx_baldwhisper.backends.cpu", "mlx_baldwhisper.cpu_ops"):  # older checkouts
        try:
            ops = "numpy" if importlib.import_module(name).enabled() else "mlx"
            break
        except ImportError:
            pass

    result = measure(model, batch, tokens, repeats, encoder_windows)
    result.update(model=str(model_path or "base"), dtype=dtype, blas=mlx_baldwhisper.BLAS,
                  cpu_ops=ops,
                  load_avg=[round(x, 2) for x in os.getloadavg()],
                  peak_memory_mb=round(mx.get_peak_memory() / 1e6, 1),
                  max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1))
    if not as_json:
        print(f"encoder {result['encoder_s']} s for {result['encoder_windows']} windows; decoder "
              f"{result['tokens_per_s']} tokens/s ({tokens} tokens x {batch})", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
