#!/usr/bin/env python
"""How α (weight of the lower layer) affects a merged decoder before any recovery training.

The decoder layers of whisper-base are merged with W = (α·W_lower + β·W_upper)/(α+β) for
several α (β = 1; only α/(α+β) matters) and scored by teacher forcing on the reference
transcripts of the English clips: cross-entropy (nats/token) and top-1 token accuracy.
Next to them: the unmerged model, the layer-removal baselines, and (per-pair table) what
merging only one pair does while the other layers stay intact.

With ``--recover-steps N`` each variant is also trained briefly (plain CE, decoder layers
only, same batches for all) on Hausa train clips and scored by teacher-forced CE on Hausa
dev clips: a small-scale version of the paper's protocol (brief recovery, then dev score).
The full search, with distillation and dev WER, is the training recipe's merge-search stage.

    python benchmarks/merge_alpha.py --alphas 0,0.05,0.1,0.2,0.3,0.5,1
    python benchmarks/merge_alpha.py --recover-steps 40 --recover-alphas 0,0.1,0.3,1 \
        --recover-groupings "0;1,2,3;4,5|0;1,2;3,4,5"
"""

from __future__ import annotations

import csv
from pathlib import Path

import click

import mlx_baldwhisper  # noqa: F401  before mlx.core: selects the optimised BLAS on Linux

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "english"
HAUSA = DATA.parent / "hausa"


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


def hausa_set(model, split: str, n: int, cache_dir: str | None = None):
    """The first ``n`` clips of a Hausa split, batched (with cached encoder features) by
    the training code's own :class:`Batcher`."""
    from mlx_baldwhisper.decoding import tokenizer_for
    from mlx_baldwhisper.dataset import prepare, read_split
    from mlx_baldwhisper.features import FeatureCache, encoder_fingerprint
    from mlx_baldwhisper.training.data import Batcher

    tk = tokenizer_for(model, "ha", "transcribe")
    items, _ = prepare(read_split(HAUSA, split, "ha")[:n], tk, model.dims.n_mels)
    cache = FeatureCache(encoder_fingerprint(model), cache_dir)
    cache.compute(model, items, batch_size=4, progress=False)
    return Batcher(items, 8, features=cache, include_mel=False)


def dev_ce(model, dev) -> float:
    from mlx_baldwhisper.training.common import ce_loss

    total, count = 0.0, 0.0
    for s in range(0, len(dev.items), 8):
        b = dev.collate(range(s, min(s + 8, len(dev.items))))
        n = float(b["mask"].sum())
        total += float(ce_loss(model, b)[0]) * n
        count += n
    return total / count


def brief_recovery(model, train, dev, steps: int, size: int = 4, lr: float = 3e-5) -> tuple[float, float]:
    """(dev CE before, dev CE after ``steps`` Adam steps on the decoder layers, 10 warm-up)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np

    from mlx_baldwhisper.training.common import ce_loss

    before = dev_ce(model, dev)
    model.freeze()
    for m in model.decoder.blocks + [model.decoder.ln]:
        m.unfreeze()
    warm = min(10, max(1, steps // 2))
    opt = optim.Adam(learning_rate=optim.join_schedules(
        [optim.linear_schedule(lr / warm, lr, warm), lambda _: lr], [warm]))
    step = nn.value_and_grad(model, lambda b: ce_loss(model, b)[0])
    rng = np.random.default_rng(0)  # the same batches for every variant
    for _ in range(steps):
        _, grads = step(train.collate(rng.choice(len(train.items), size, replace=False)))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    return before, dev_ce(model, dev)


def recovery_table(ckpt, steps: int, alphas: str, groupings: str, n_train: int, n_dev: int,
                   cache: str | None) -> None:
    from mlx_baldwhisper.surgery import DEFAULT_ALPHA, Surgery, apply_surgery
    from mlx_baldwhisper.load import build_model

    full = build_model(ckpt)
    train, dev = hausa_set(full, "train", n_train, cache), hausa_set(full, "dev", n_dev, cache)
    print(f"Brief recovery: {steps} steps × 4 Hausa train clips, dev CE on {n_dev} clips\n")
    print("| decoder | dev CE before | dev CE after |\n|---|---|---|")
    variants = [("base (6 layers)", None), ("removal: keep 0,2,5", Surgery(drop=3))]
    variants += [(f"merged α={a}, β=1", Surgery(merge=True, alpha=float(a), beta=1.0))
                 for a in alphas.split(",")]
    variants += [(f"groups {g}, α={DEFAULT_ALPHA:g}, β=1", Surgery(merge_groups=g))
                 for g in groupings.split("|") if g]
    for name, s in variants:
        model = build_model(ckpt if s is None else apply_surgery(ckpt, s))
        print("| {} | {:.3f} | {:.3f} |".format(name, *brief_recovery(model, train, dev, steps)), flush=True)


def zero_shot_tables(ckpt, data: Path, alphas: str, pair_alphas: str, groupings: str) -> None:
    import mlx.core as mx

    from mlx_baldwhisper.surgery import Surgery, apply_surgery
    from mlx_baldwhisper.load import build_model

    full = build_model(ckpt)
    mel, texts = reference_set(data, full.dims.n_mels)
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

    def grid(title: str, rows: list[tuple[str, str]], cols: list[str]) -> None:
        print(f"\n{title} (CE nats/token / token accuracy):\n")
        print("| groups | " + " | ".join(f"α={a}" for a in cols) + " |\n|" + "---|" * (len(cols) + 1))
        for label, groups in rows:
            cells = []
            for a in cols:
                alpha, beta = (1.0, 0.0) if a == "inf" else (float(a), 1.0)
                ce, acc = run(Surgery(merge_groups=groups, alpha=alpha, beta=beta))
                cells.append(f"{ce:.2f} / {acc:.0%}")
            print(f"| {label} | " + " | ".join(cells) + " |")

    # Which pair is hard to merge, and does the best α depend on it? ('inf' keeps the lower layer)
    pairs = [(f"only ({lo},{lo + 1})", f"{lo},{lo + 1}") for lo in range(0, ckpt.dims.n_text_layer, 2)]
    grid("One pair merged, the other layers intact", pairs, pair_alphas.split(","))
    # Other ways to reach 3 layers (a 1-layer group is kept as it is)
    grid("Other 3-layer groupings", [(g, g) for g in groupings.split("|") if g], ["0", "0.1", "0.3"])


@click.command()
@click.option("--alphas", default="0,0.05,0.1,0.2,0.3,0.5,1", show_default=True)
@click.option("--pair-alphas", default="0,0.1,0.3,1,inf", show_default=True,
              help="α values for the one-pair-at-a-time table ('inf' = keep the lower layer).")
@click.option("--groupings", default="0,1;2,3;4,5|0;1,2,3;4,5|0;1,2;3,4,5|0,1,2;3,4,5",
              show_default=True, help="Decoder groupings compared, separated by '|'.")
@click.option("--data", default=str(DATA), show_default=True)
@click.option("--recover-steps", default=0, show_default=True, help="0: zero-shot tables only.")
@click.option("--recover-alphas", default="0,0.1,0.3,1", show_default=True)
@click.option("--recover-groupings", default="", help="Groupings recovered too (at the default α).")
@click.option("--train-clips", default=64, show_default=True)
@click.option("--dev-clips", default=32, show_default=True)
@click.option("--feature-cache", default=None, help="Keep the Hausa encoder features here.")
def main(alphas, pair_alphas, groupings, data, recover_steps, recover_alphas, recover_groupings,
         train_clips, dev_clips, feature_cache):
    from mlx_baldwhisper.weights import read_checkpoint

    ckpt = read_checkpoint(None)
    if recover_steps:
        recovery_table(ckpt, recover_steps, recover_alphas, recover_groupings, train_clips,
                       dev_clips, feature_cache)
    else:
        zero_shot_tables(ckpt, Path(data), alphas, pair_alphas, groupings)


if __name__ == "__main__":
    main()
