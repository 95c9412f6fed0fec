"""kill -9 at random moments of a training stage (some inside checkpoint and model-folder
writes): rerunning the same command always ends with the weights of an uninterrupted
run, bit for bit, and no torn checkpoint or model folder is ever visible. The trials are
benchmarks/faults.py's, here on a tiny model."""

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from faults import CONFIG, differences, kill_trials, stage_command  # noqa: E402

STEPS = 160
TRAINING_KILLS, MODEL_KILLS = 20, 4
WINDOW = (0.2, 4.5)  # seconds after the start: the tiny stage trains from about 2.5 s
STEP_CAP = 6  # a random kill lets at most ~6 steps through: 20 kills stay under STEPS on any machine


def records(run: Path) -> list[tuple[str, int]]:
    return [(r["kind"], r["step"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_kill_9_anywhere_then_the_same_command_ends_bit_identical(corpus):
    (corpus / "cfg.json").write_text(json.dumps(CONFIG))

    def command(out: str) -> list[str]:
        return stage_command(corpus / out, str(corpus / "train.tsv"), str(corpus / "dev.tsv"),
                             corpus / "cfg.json", corpus / f"cache-{out}", STEPS, "--model",
                             str(corpus / "start"), "--batch-size", "2", "--eval-limit", "1", "--lr", "1e-3")

    done = subprocess.run(command("ref"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    kills, torn = kill_trials(command("killed"), corpus / "killed", corpus / "cache-killed",
                              TRAINING_KILLS, MODEL_KILLS, random.Random(16), WINDOW, STEP_CAP)
    assert len(kills) == TRAINING_KILLS + MODEL_KILLS and torn == [], (kills, torn)
    finished = subprocess.run(command("killed"), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"completed after {STEPS} steps" in finished.stdout

    landed = Counter(h for hit in kills for h in hit)
    print(f"\n{len(kills)} kills; where they landed: {dict(landed)}")
    assert landed["checkpoint"] >= TRAINING_KILLS // 4 and landed["model folder"] >= MODEL_KILLS // 2, landed
    assert differences(corpus / "ref", corpus / "killed") == []
    best = [json.loads((corpus / f"{n}.run" / "best.json").read_text()) for n in ("ref", "killed")]
    assert best[0] == best[1]
    assert records(corpus / "ref.run") == records(corpus / "killed.run")
