#!/usr/bin/env python
"""Feature caching and a short fine-tune, timed under 1 or N processes.

    python benchmarks/distributed.py --train ../shared/data/hausa/train.tsv --clips 64 --steps 50
    mlx.launch -n 2 --backend ring -- python benchmarks/distributed.py --train ... --clips 64 --steps 50

The real ``finetune`` stage (whisper-base, decoder-only on cached features, batch 8, no
dev evaluation during training) on the first --clips clips of the manifest, with a fresh
feature cache. Rank 0 prints one JSON line: caching seconds, training seconds (first step
left out: it allocates), clips/s, the gradient bytes each step all-reduces, and with
several processes the time of that all-reduce alone (``allreduce_s``, mean of 5).

On one machine, start the ranks by hand (the ring backend reads MLX_RANK and MLX_HOSTFILE):
mlx.launch's own process keeps a core busy (MLX 0.32.4), which a 2-core machine cannot spare.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import click

import mlx_baldwhisper  # noqa: F401  before mlx.core: selects the optimised BLAS on Linux


@click.command()
@click.option("--train", required=True, help="A manifest; its first --clips clips are used.")
@click.option("--language", default="ha", show_default=True, help="Language of the manifest.")
@click.option("--clips", default=64, show_default=True, help="Clips to cache and train on.")
@click.option("--steps", default=50, show_default=True, help="Optimizer steps.")
@click.option("--batch", default=8, show_default=True, help="Global batch size.")
@click.option("--workdir", default=None, help="Shared scratch folder (default: a temp folder).")
@click.option("--allreduce-only", is_flag=True, help="Only time the gradient all-reduce.")
def main(train, language, clips, steps, batch, workdir, allreduce_only):
    from mlx.utils import tree_flatten

    from mlx_baldwhisper import load_model
    from mlx_baldwhisper.dataset import read_manifest
    from mlx_baldwhisper.training import distributed
    from mlx_baldwhisper.training.common import load_data
    from mlx_baldwhisper.training.finetune import FinetuneConfig, finetune
    from mlx_baldwhisper.training.trainer import TrainConfig

    if allreduce_only:
        import mlx.core as mx

        model = load_model()
        model.freeze()
        model.decoder.unfreeze()
        grads = model.trainable_parameters()
        distributed.average_gradients(grads)  # warm-up
        t0 = time.perf_counter()
        for _ in range(5):
            mx.eval(distributed.average_gradients(grads))
        if distributed.is_main():
            print(json.dumps({"processes": distributed.size(), "gradient_bytes": sum(
                v.nbytes for _, v in tree_flatten(grads)),
                "allreduce_s": round((time.perf_counter() - t0) / 5, 3), "load_avg": os.getloadavg()}))
        return
    root = Path(workdir or tempfile.mkdtemp(prefix="mlxbw-dist-"))
    tag = f"n{distributed.size()}-{os.environ.get('OPENBLAS_NUM_THREADS', '1')}t"
    subset = root / f"subset-{tag}.tsv"
    if distributed.is_main():
        items = read_manifest(train)[:clips]
        subset.write_text("path\tsentence\n" + "".join(f"{x.audio}\t{x.text}\n" for x in items))
    distributed.barrier()
    model = load_model()
    t0 = time.perf_counter()
    data = load_data(model, str(subset), str(subset), language, str(root / f"cache-{tag}"))
    caching = time.perf_counter() - t0
    cfg = FinetuneConfig(train=TrainConfig(lr=1e-4, warmup_steps=5, max_steps=steps, log_every=1,
                                           plot=False, progress=False), batch_size=batch)
    t0 = time.perf_counter()
    finetune(model, data, cfg, root / f"model-{tag}")
    total = time.perf_counter() - t0
    rows = [json.loads(line) for line in (root / f"model-{tag}.run" / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed"] for r in rows if r["kind"] == "train"]
    per_step = (elapsed[-1] - elapsed[0]) / max(len(elapsed) - 1, 1)
    grads = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    allreduce = None
    if distributed.size() > 1:  # the communication alone: the step's all-reduce, 5 times
        import mlx.core as mx

        grad_tree = model.trainable_parameters()
        distributed.average_gradients(grad_tree)  # warm-up
        t0 = time.perf_counter()
        for _ in range(5):
            mx.eval(distributed.average_gradients(grad_tree))
        allreduce = round((time.perf_counter() - t0) / 5, 3)
    if distributed.is_main():
        print(json.dumps({"processes": distributed.size(),
                          "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "1"),
                          "clips": len(data.train), "caching_s": round(caching, 1),
                          "train_s_incl_final_eval": round(total, 1), "s_per_step": round(per_step, 3),
                          "clips_per_s": round(batch / per_step, 2), "gradient_bytes": grads,
                          "allreduce_s": allreduce, "load_avg": os.getloadavg()}))


if __name__ == "__main__":
    main()
