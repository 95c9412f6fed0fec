#!/usr/bin/env python
"""How α (weight of the lower layer) affects a merged decoder before any recovery training.

For each α (β = 1; only α/(α+β) matters) the decoder layer pairs of whisper-base are
merged and the teacher-forced cross-entropy of the reference transcripts is measured on
held-out English clips, next to the unmerged model and the layer-removal baseline.

    python benchmarks/merge_alpha.py --alphas 0,0.05,0.1,0.2,0.3,0.5,1
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click

import mlx_baldwhisper  # noqa: F401  before mlx.core: selects the optimised BLAS on Linux


def reference_batches(folder: Path, n_mels: int):
    import mlx.core as mx

    from mlx_baldwhisper.audio import N_SAMPLES, load_audio, log_mel_spectrogram, pad_or_trim

    rows = list(csv.DictReader(open(folder / "transcripts.tsv"), delimiter="\t"))
    mels = [log_mel_spectrogram(pad_or_trim(load_audio(str(folder / r["path"])), N_SAMPLES), n_mels)
            for r in rows]
    return mx.stack(mels), [r["sentence"] for r in rows]


def teacher_forced_ce(model, feats, texts) -> float:
    import mlx.core as mx
    import numpy as np

    from mlx_baldwhisper.decoding import tokenizer_for
    from mlx_baldwhisper.training.losses import cross_entropy

    tk = tokenizer_for(model, "en", "transcribe")
    prompt = list(tk.sot_sequence_including_notimestamps)
    total, count = 0.0, 0
    for i, text in enumerate(texts):
        seq = prompt + tk.encode(" " + text.strip()) + [tk.eot]
        inp, tgt = mx.array([seq[:-1]]), mx.array([seq[1:]])
        mask = mx.array([[0.0] * (len(prompt) - 1) + [1.0] * (len(seq) - len(prompt))])
        logits = model.decoder(inp, feats[i:i + 1])[0]
        n = float(mask.sum())
        total += float(cross_entropy(logits, tgt, mask)) * n
        count += n
    return total / count


@click.command()
@click.option("--alphas", default="0,0.05,0.1,0.2,0.3,0.5,1", show_default=True)
@click.option("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "english"))
def main(alphas: str, data: str):
    import mlx.core as mx

    from mlx_baldwhisper.convert import Surgery, apply_surgery
    from mlx_baldwhisper.load import build_model
    from mlx_baldwhisper.weights import read_checkpoint

    ckpt = read_checkpoint(None)
    full = build_model(ckpt)
    mel, texts = reference_batches(Path(data), full.dims.n_mels)
    feats = full.embed_audio(mel)
    mx.eval(feats)
    rows = [{"model": "base (6 layers)", "ce": teacher_forced_ce(full, feats, texts)}]
    rows.append({"model": "removal (keep 0,2,5)",
                 "ce": teacher_forced_ce(build_model(apply_surgery(ckpt, Surgery(drop=3))), feats, texts)})
    for a in [float(x) for x in alphas.split(",")]:
        merged = build_model(apply_surgery(ckpt, Surgery(merge=True, alpha=a, beta=1.0)))
        rows.append({"model": f"merged α={a:g}, β=1", "ce": teacher_forced_ce(merged, feats, texts)})
    print("| model | teacher-forced CE (nats/token) |\n|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['ce']:.3f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
