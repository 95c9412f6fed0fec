#!/usr/bin/env python
"""kill -9 trials on the real ``finetune`` stage (whisper-base by default).

    python benchmarks/faults.py --train ../shared/data/hausa/train.tsv --clips 16 --steps 6 --kills 5

Runs the stage once uninterrupted, then runs the same command again and again into
another folder, SIGKILLing it at random moments and while it writes a checkpoint or its
model folder, and finally lets it finish. Prints one JSON line: the kills, where they
landed (judged by the temp files each left), whether a torn checkpoint or model folder
was ever visible, and whether the final checkpoint and model folder are bit-identical
to the uninterrupted run's. tests/test_kill.py runs the same trials on a tiny model.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import click

import mlx_baldwhisper  # noqa: F401  before mlx.core: selects the optimised BLAS on Linux

# Settings that keep the trials comparable: no plot or progress bar, and a learning rate
# that does not depend on max_steps.
CONFIG = {"finetune": {"train": {"plot": False, "progress": False, "log_every": 1,
                                 "schedule": "constant"}}}


def stage_command(out: Path, train: str, dev: str, config: Path, cache: Path, steps: int,
                  *extra: str) -> list[str]:
    return [sys.executable, "-m", "mlx_baldwhisper", "finetune", "--train", train, "--dev", dev,
            "--language", "ha", "--out", str(out), "--max-steps", str(steps), "--save-every", "1",
            "--config", str(config), "--cache-dir", str(cache), *extra]


def run_folder(out: Path) -> Path:
    return out.with_name(out.name + ".run")


def temp_files(out: Path, cache: Path) -> dict[str, set[str]]:
    """The temp files of each kind of write, by name: what a killed process was writing."""
    ckpts = run_folder(out) / "checkpoints"
    kinds = {"checkpoint": (ckpts, (".tmp-*", ".old-*")), "latest pointer": (ckpts, (".latest.tmp-*",)),
             "model folder": (out.parent, (f".{out.name}.mbw-*",)), "feature cache": (cache, ("*.tmp",))}
    return {kind: {p.name for g in globs for p in folder.glob(g)} for kind, (folder, globs) in kinds.items()}


def kill_once(args: list[str], out: Path, cache: Path, mode: str, rng: random.Random,
              window: tuple[float, float], step_cap: Optional[int] = None) -> Optional[list[str]]:
    """Start the command and SIGKILL it: ``window`` seconds after it starts (mode "random"),
    or while it writes its 1st to 4th checkpoint, or its model folder. None if it ended
    first; else the writes it was in the middle of.

    ``step_cap`` bounds a random kill's progress: it comes at the latest a random moment
    of the step after the run began its 1st to ``step_cap``-th checkpoint, so a fast
    machine cannot finish the run before the trials end."""
    before = temp_files(out, cache)
    watched = "checkpoint" if mode == "random" else mode
    if mode == "checkpoint":
        nth, linger = rng.randint(1, 4), 0.06
    elif mode == "random":
        nth, linger = (rng.randint(1, step_cap) if step_cap else 1), 0.15  # no cap: no draw, as before
    else:
        nth, linger = 1, 0.005
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + (rng.uniform(*window) if mode == "random" else 3600)
    started: set[str] = set()  # the writes of the watched kind that this process began
    while proc.poll() is None and time.monotonic() < deadline:
        if mode != "random" or step_cap:
            started |= temp_files(out, cache)[watched] - before[watched]
        if len(started) >= nth:
            time.sleep(rng.uniform(0, linger))
            break
        time.sleep(0.001)
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    after = temp_files(out, cache)
    return [kind for kind in after if after[kind] - before[kind]] or ["between writes"]


def torn(out: Path) -> list[str]:
    """Visible outputs that do not read back whole: must stay empty whatever is killed."""
    from mlx_baldwhisper import load_model
    from mlx_baldwhisper.training.checkpoint import verify_checkpoint

    reasons = {p: verify_checkpoint(p) for p in (run_folder(out) / "checkpoints").glob("step-*")}
    bad = [f"{p}: {reason}" for p, reason in reasons.items() if reason is not None]
    if out.exists():
        try:
            load_model(str(out))
        except Exception as e:  # noqa: BLE001  reported, not raised: it is the finding
            bad.append(f"{out}: {e}")
    return bad


def kill_trials(args: list[str], out: Path, cache: Path, training_kills: int, model_kills: int,
                rng: random.Random, window: tuple[float, float], step_cap: Optional[int] = None
                ) -> tuple[list[list[str]], list[str]]:
    """Random and mid-checkpoint kills alternate while the run trains, then its model
    folder, written once the final evaluation ends, is hit in a few reruns. Returns where
    each kill landed, and anything found torn after one."""
    kills: list[list[str]] = []
    broken: list[str] = []
    for attempt in range(3 * (training_kills + model_kills)):
        if len(kills) == training_kills + model_kills:
            break
        mode = ("random", "checkpoint")[attempt % 2] if len(kills) < training_kills else "model folder"
        hit = kill_once(args, out, cache, mode, rng, window, step_cap)
        if hit is not None:  # None: the process ended before the kill
            kills.append(hit)
            broken += torn(out)
    return kills, broken


def differences(ref: Path, out: Path) -> list[str]:
    """Files of the final checkpoint and model folder whose arrays differ between two runs."""
    import mlx.core as mx
    import numpy as np

    from mlx_baldwhisper.training.checkpoint import latest_checkpoint

    pairs = [(latest_checkpoint(run_folder(ref)) / f, latest_checkpoint(run_folder(out)) / f)
             for f in ("model.safetensors", "optimizer.safetensors")]
    pairs.append((ref / "weights.safetensors", out / "weights.safetensors"))
    diff = []
    for a, b in pairs:
        x, y = mx.load(str(a)), mx.load(str(b))
        if x.keys() != y.keys() or any(not np.array_equal(np.array(x[k]), np.array(y[k])) for k in x):
            diff.append(b.name)
    return diff


@click.command()
@click.option("--train", required=True, help="A manifest; its first --clips clips are used.")
@click.option("--model", default=None, help="Starting model (default: the embedded whisper-base).")
@click.option("--clips", default=16, show_default=True, help="Training clips (the first 4 are the dev set).")
@click.option("--steps", default=6, show_default=True, help="Optimizer steps of the stage.")
@click.option("--kills", default=5, show_default=True, help="Kills while training (then 2 in the model save).")
@click.option("--seed", default=16, show_default=True, help="Seed of the kill moments.")
@click.option("--workdir", default=None, help="Scratch folder (default: a temp folder).")
def main(train, model, clips, steps, kills, seed, workdir):
    from mlx_baldwhisper.dataset import read_manifest

    root = Path(workdir or tempfile.mkdtemp(prefix="mlxbw-faults-"))
    items = read_manifest(train)[:clips]
    for name, rows in (("train", items), ("dev", items[:4])):
        (root / f"{name}.tsv").write_text("path\tsentence\n" + "".join(f"{x.audio}\t{x.text}\n" for x in rows))
    (root / "cfg.json").write_text(json.dumps(CONFIG))
    extra = ["--batch-size", "4", "--eval-limit", "2", *(["--model", model] if model else [])]

    def command(out: str, cache: str) -> list[str]:
        return stage_command(root / out, str(root / "train.tsv"), str(root / "dev.tsv"),
                             root / "cfg.json", root / cache, steps, *extra)

    t0 = time.perf_counter()
    reference = subprocess.run(command("ref", "cache-ref"), capture_output=True, text=True)
    if reference.returncode:
        raise SystemExit(reference.stderr[-3000:])
    uninterrupted = time.perf_counter() - t0
    # random kills over the whole life of an uninterrupted process
    killed, broken = kill_trials(command("killed", "cache-killed"), root / "killed", root / "cache-killed",
                                 kills, 2, random.Random(seed), (0.2, uninterrupted))
    final = subprocess.run(command("killed", "cache-killed"), capture_output=True, text=True)
    if final.returncode:
        raise SystemExit(final.stderr[-3000:])
    diff = differences(root / "ref", root / "killed")
    print(json.dumps({"model": model or "embedded base", "steps": steps, "kills": len(killed),
                      "landed": dict(Counter(h for hit in killed for h in hit)), "torn_visible": broken,
                      "final_differs_in": diff, "bit_identical": not diff,
                      "uninterrupted_s": round(uninterrupted, 1),
                      "total_s": round(time.perf_counter() - t0, 1), "workdir": str(root)}))


if __name__ == "__main__":
    main()
