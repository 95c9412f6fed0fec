#!/usr/bin/env python
"""Recovery ideas one at a time (issue 17): each variant recovers and shears the same teacher.

    python benchmarks/recovery_ablation.py --teacher-run runs/s9 \
        --config benchmarks/hausa_recipe_longform.json --out runs/ablation \
        --variants baseline,hidden,seqkd,early,untuned,search,chosen,removal --procs 2 [--seed N]

(``--variants`` defaults to all of them, also ``hidden-both``, ``shear-best``, their
combination ``hidden-both-best`` and ``removal-hidden``.)

Each variant is the shipped config with a few keys changed (VARIANTS below): each recovery
idea alone, none of them (``baseline``), and the shipped combination (``chosen``). Its run is
``OUT/<variant>``: the teacher of ``--teacher-run`` is copied in with its results entry,
then ``mlx_baldwhisper recipe --stages merged,final`` runs in ``--procs`` processes (the
ring backend on one machine, ranks started by hand as in RESULTS.md); the ``removal``
variants run the ``removed`` stage instead. A finished variant is not run again (its wall
clock is kept in ``OUT/<variant>.seconds``). The table (dev WER/CER of teacher, merged and
final, retention WER_teacher/WER_final, the same for the merged model, wall clock) goes to
``OUT/ablation.md`` and standard output.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click


def merged(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


# Every recovery idea off: the config before issue 17.
NONE = {"recover": {"hidden_weight": 0.0, "seqkd_prob": 0.0, "untuned_kl_weight": 0.0,
                    "train": {"patience": None}},
        "shear": {"hidden_weight": 0.0, "train": {"eval_every": 0}}, "search": None}
IDEAS: dict[str, dict] = {
    # intermediate-layer distillation: each merged layer matches its group's last teacher layer
    "hidden": {"recover": {"hidden_weight": 0.1}},
    # the same, kept on through the shear stage (its layers still map through the merge record)
    "hidden-both": {"recover": {"hidden_weight": 0.1}, "shear": {"hidden_weight": 0.1}},
    # the shear checkpoint chosen by dev WER: scored every 75 of its 300 steps, the best kept
    "shear-best": {"shear": {"train": {"eval_every": 75}}},
    # sequence-level KD: half the clips train on the teacher's transcript (WER <= 0.5 to the human one)
    "seqkd": {"recover": {"seqkd_prob": 0.5, "seqkd_max_wer": 0.5}},
    # the recovery budget chosen by dev WER: evaluate every 50 steps, stop after 2 without gain
    "early": {"recover": {"eval_limit": 200, "train": {"max_steps": 700, "eval_every": 50, "patience": 2}}},
    # a pull towards the untuned whisper-base's outputs on the same batches
    "untuned": {"recover": {"untuned_kl_weight": 0.1}},
    # per-group α/β by successive halving (9 candidates, 3 go on with 3x the steps)
    "search": {"search": {"trials": 9, "eta": 3}},
}
# Each idea alone is the shipped config with the others off and it on; "chosen" is the
# shipped config as it is, and the removal baseline recovers as it does.
VARIANTS: dict[str, dict] = {
    "baseline": NONE,
    **{name: merged(NONE, idea) for name, idea in IDEAS.items()},
    # intermediate-layer distillation in both stages and the dev-chosen shear checkpoint
    "hidden-both-best": merged(merged(NONE, IDEAS["hidden-both"]), IDEAS["shear-best"]),
    "chosen": {},
    # merging vs removal at the same budget: the teacher's layers 0, 2, 5 kept
    "removal": {},
    # ... and with the same intermediate-layer distillation as the merged "hidden" variants
    "removal-hidden": merged(NONE, IDEAS["hidden"]),
}
# Variants that run other stages than --stages (the removal baselines have no final model).
STAGES: dict[str, str] = {"removal": "removed", "removal-hidden": "removed"}


def run_variant(name: str, cfg: dict, teacher_run: Path, out: Path, args: list[str], procs: int,
                stages: str) -> float:
    run = out / name
    if not (run / "teacher").exists():
        run.mkdir(parents=True, exist_ok=True)
        shutil.copytree(teacher_run / "teacher", run / "teacher")
        teacher = json.loads((teacher_run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps(
            {"stages": {"teacher": teacher["stages"]["teacher"]}, "data": teacher.get("data", {})}, indent=1))
    (out / f"{name}.json").write_text(json.dumps(cfg, indent=1))
    command = [sys.executable, "-m", "mlx_baldwhisper", "recipe", "--stages", stages, "--out", str(run),
               "--config", str(out / f"{name}.json"), *args]
    hosts = out / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{5711 + r}"] for r in range(procs)]))
    start = time.perf_counter()
    ranks = []
    for r in reversed(range(procs)):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MLX_BALDWHISPER_ENCODER_THREADS": "1"}
        if procs > 1:
            env.update(MLX_RANK=str(r), MLX_HOSTFILE=str(hosts))
        log = open(out / f"{name}.rank{r}.log", "w")
        ranks.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    if any(p.wait() for p in ranks):
        raise SystemExit(f"variant {name} failed: see {out / (name + '.rank0.log')}")
    return time.perf_counter() - start


def row(name: str, results: dict, seconds: float | None) -> str:
    """The removal baseline's model stands in the merged column (same size, same budget)."""
    s = results["stages"]
    compressed = s.get("merged") or s.get("removed")
    cells = [name]
    for r in (s.get("teacher"), compressed, s.get("final")):
        cells.append(f"{100 * r['wer']:.2f} / {100 * r['cer']:.2f}" if r else "-")
    for r in (s.get("final"), compressed):
        cells.append(f"{s['teacher']['wer'] / r['wer']:.3f}" if r else "-")
    cells.append(f"{seconds / 60:.0f} min" if seconds else "(earlier run)")
    return "| " + " | ".join(cells) + " |"


@click.command()
@click.option("--teacher-run", required=True, type=click.Path(exists=True, file_okay=False),
              help="A recipe folder holding teacher/ and its results.json.")
@click.option("--config", required=True, type=click.Path(exists=True), help="The shipped recipe config.")
@click.option("--out", required=True, help="Folder for the variants' runs.")
@click.option("--variants", default=",".join(VARIANTS), show_default=True)
@click.option("--train", default="../shared/data/hausa/train.tsv", show_default=True)
@click.option("--dev", default="../shared/data/hausa/dev.tsv", show_default=True)
@click.option("--language", default="ha", show_default=True)
@click.option("--cache-dir", default=None, help="Shared feature cache (default: OUT/cache).")
@click.option("--procs", default=2, show_default=True, help="Training processes per variant.")
@click.option("--stages", default="merged,final", show_default=True)
@click.option("--seed", type=int, default=None,
              help="Every stage's seed (the recipe's --seed; default: the config's).")
def main(teacher_run, config, out, variants, train, dev, language, cache_dir, procs, stages, seed):
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = json.loads(Path(config).read_text())
    args = ["--train", train, "--dev", dev, "--language", language,
            "--cache-dir", cache_dir or str(out_dir / "cache"), *(["--seed", str(seed)] if seed is not None else [])]
    lines = ["| variant | teacher WER / CER | merged WER / CER | final WER / CER | retention | "
             "merged retention | wall clock |", "|---|---|---|---|---|---|---|"]
    for name in variants.split(","):
        if name not in VARIANTS:
            raise click.BadParameter(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        runs = STAGES.get(name, stages)
        done = out_dir / name / "results.json"
        finished = done.exists() and all(s in json.loads(done.read_text())["stages"] for s in runs.split(","))
        clock = out_dir / f"{name}.seconds"
        cfg = merged(base, VARIANTS[name])
        steps = f"search,{runs}" if cfg.get("search") is not None else runs  # the merged stage needs it
        if not finished:
            clock.write_text(str(round(run_variant(name, cfg, Path(teacher_run), out_dir, args, procs, steps), 1)))
        seconds = float(clock.read_text()) if clock.exists() else None
        lines.append(row(name, json.loads(done.read_text()), seconds))
        (out_dir / "ablation.md").write_text("\n".join(lines) + "\n")
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
