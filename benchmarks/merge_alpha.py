#!/usr/bin/env python
"""How α (weight of the lower layer) affects a merged decoder before any recovery training.

The decoder layers of whisper-base are merged with W = (α·W_lower + β·W_upper)/(α+β) for
several α (β = 1; only α/(α+β) matters) and scored by teacher forcing on the reference
transcripts of the English clips: cross-entropy (nats/token) and top-1 token accuracy.
Next to them: the unmerged model, the layer-removal baselines, and (per-pair table) what
merging only one pair does while the other layers stay intact.

    python benchmarks/merge_alpha.py --alphas 0,0.05,0.1,0.2,0.3,0.5,1
"""

from __future__ import annotations

import csv
from pathlib import Path

import click

import mlx_baldwhisper  # noqa: F401  before mlx.core: selects the optimised BLAS on Linux

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "english"


def reference_set(folder: Path, n_mels: int):
    import mlx.core as mx

    from mlx_baldwhisper.audio import N_SAMPLES, load_audio, log_mel_spectrogram, pad_or_trim

    rows = list(csv.DictReader(open(folder / "transcripts.tsv"), delimiter="\t"))
    mels = [log_mel_spectrogram(pad_or_trim(load_audio(str(folder / r["path"])), N_SAMPLES), n_mels)
            for r in rows]
    return mx.stack(mels), [r["sentence"] for r in rows]


def score(model, feats, texts) -> tuple[float, float]:
    """Teacher-forced (cross-entropy in nats/token, top-1 accuracy) over the text tokens + eot."""
    import mlx.core as mx

    from mlx_baldwhisper.decoding import tokenizer_for
    from mlx_baldwhisper.training.losses import cross_entropy

    tk = tokenizer_for(model, "en", "transcribe")
    prompt = list(tk.sot_sequence_including_notimestamps)
    ce, hits, count = 0.0, 0.0, 0
    for i, text in enumerate(texts):
        seq = prompt + tk.encode(" " + text.strip()) + [tk.eot]
        inp, tgt = mx.array([seq[:-1]]), mx.array([seq[1:]])
        mask = mx.array([[0.0] * (len(prompt) - 1) + [1.0] * (len(seq) - len(prompt))])
        logits = model.decoder(inp, feats[i:i + 1])[0]
        n = float(mask.sum())
        ce += float(cross_entropy(logits, tgt, mask)) * n
        hits += float(((logits.argmax(-1) == tgt) * mask).sum())
        count += n
    return ce / count, hits / count


@click.command()
@click.option("--alphas", default="0,0.05,0.1,0.2,0.3,0.5,1", show_default=True)
@click.option("--pair-alphas", default="0,0.1,0.3,1", show_default=True,
              help="α values for the one-pair-at-a-time table ('inf' = keep the lower layer).")
@click.option("--data", default=str(DATA), show_default=True)
def main(alphas: str, pair_alphas: str, data: str):
    import mlx.core as mx

    from mlx_baldwhisper.convert import Surgery, apply_surgery
    from mlx_baldwhisper.load import build_model
    from mlx_baldwhisper.weights import read_checkpoint

    ckpt = read_checkpoint(None)
    full = build_model(ckpt)
    mel, texts = reference_set(Path(data), full.dims.n_mels)
    feats = full.embed_audio(mel)
    mx.eval(feats)

    def run(surgery: Surgery):
        return score(build_model(apply_surgery(ckpt, surgery)), feats, texts)

    rows = [("base (6 layers, unmerged)", score(full, feats, texts)),
            ("removal: keep 0,2,5 (Distil-Whisper spacing)", run(Surgery(drop=3))),
            ("removal: keep 0,2,4 (lower of each pair)", run(Surgery(merge=True, alpha=1, beta=0)))]
    for a in [float(x) for x in alphas.split(",")]:
        name = "  = removal: keep 1,3,5" if a == 0 else ""
        rows.append((f"merged α={a:g}, β=1 (α/(α+β)={a / (a + 1):.3f}){name}",
                     run(Surgery(merge=True, alpha=a, beta=1.0))))
    print("| decoder | CE (nats/token) | token accuracy |\n|---|---|---|")
    for name, (ce, acc) in rows:
        print(f"| {name} | {ce:.3f} | {acc:.1%} |")

    # One pair at a time: which pair is hard to merge, and does the best α depend on it?
    pas = pair_alphas.split(",")
    print("\nOne pair merged, the other layers intact (CE nats/token / token accuracy):\n")
    print("| pair | " + " | ".join(f"α={a}" for a in pas) + " |\n|---" * (len(pas) + 1) + "|")
    for lo in range(0, ckpt.dims.n_text_layer, 2):
        cells = []
        for a in pas:
            alpha, beta = (1.0, 0.0) if a == "inf" else (float(a), 1.0)
            ce, acc = run(Surgery(merge_groups=f"{lo},{lo + 1}", alpha=alpha, beta=beta))
            cells.append(f"{ce:.2f} / {acc:.0%}")
        print(f"| ({lo},{lo + 1}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
