#!/usr/bin/env python
"""What a fine-tuning step costs: decoder-only on cached encoder features vs. full fine-tuning.

    python benchmarks/finetune_cost.py --train ../shared/data/hausa/train.tsv --clips 48 --steps 4

Both modes run the real ``finetune`` stage (AdamW, clipping, batch 8) on the same clips of
the manifest, on whisper-base. Reported: seconds per optimizer step (the first step,
which allocates, is left out), and for the frozen encoder the one-off encoding cost per
clip that the cache pays once for the whole recipe (the subset serves as train and dev,
so each clip is decoded and encoded twice; the figure is per encoding). The last line is JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import click

import mlx_baldwhisper  # noqa: F401  before mlx.core: selects the optimised BLAS on Linux


def _subset(manifest: str, n: int, folder: Path) -> str:
    from mlx_baldwhisper.dataset import read_manifest

    items = read_manifest(manifest)[:n]
    path = folder / "subset.tsv"
    path.write_text("path\tsentence\n" + "".join(f"{x.audio}\t{x.text}\n" for x in items))
    return str(path)


def _step_seconds(metrics: Path) -> list[float]:
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    t = [r["elapsed"] for r in rows if r["kind"] == "train"]
    return [b - a for a, b in zip(t, t[1:])]


@click.command()
@click.option("--train", required=True, help="A manifest; its first --clips clips are used.")
@click.option("--language", default="ha", show_default=True)
@click.option("--clips", default=48, show_default=True)
@click.option("--steps", default=4, show_default=True)
@click.option("--batch", default=8, show_default=True)
def main(train, language, clips, steps, batch):
    from mlx_baldwhisper import load_model
    from mlx_baldwhisper.training.common import load_data
    from mlx_baldwhisper.training.finetune import FinetuneConfig, finetune
    from mlx_baldwhisper.training.trainer import TrainConfig

    result = {"clips": clips, "batch": batch, "steps": steps,
              "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory(prefix="mlxbw-ftcost-") as tmp:
        tmp = Path(tmp)
        subset = _subset(train, clips, tmp)
        for mode, frozen in (("decoder_only_cached", True), ("full", False)):
            model = load_model()
            t0 = time.perf_counter()
            data = load_data(model, subset, subset, language, str(tmp / "cache") if frozen else None,
                             cache_features=frozen)
            prep = time.perf_counter() - t0
            cfg = FinetuneConfig(batch_size=batch, freeze_encoder=frozen, eval_limit=1,
                                 train=TrainConfig(lr=1e-5, max_steps=steps, log_every=1,
                                                   plot=False, progress=False))
            finetune(model, data, cfg, tmp / mode)
            per_step = _step_seconds(tmp / f"{mode}.run" / "metrics.jsonl")
            result[mode] = {"seconds_per_step": round(sum(per_step) / len(per_step), 2),
                            "prepare_seconds": round(prep, 1)}
            if frozen:
                result[mode]["prepare_and_encode_seconds_per_clip"] = round(prep / (2 * clips), 2)
            print(mode, result[mode], flush=True)
    result["full_over_cached"] = round(result["full"]["seconds_per_step"]
                                       / result["decoder_only_cached"]["seconds_per_step"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
