"""Data-parallel training: 2 processes on 127.0.0.1 (ring backend) equal 1 process on the
same global batch, and a killed rank stops the other and the relaunch resumes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_baldwhisper.training.checkpoint import latest_checkpoint

LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finetune_args(corpus: Path, out: Path, steps: int) -> list[str]:
    return ["-m", "mlx_baldwhisper", "finetune", "--model", str(corpus / "start"),
            "--train", str(corpus / "train.tsv"), "--dev", str(corpus / "dev.tsv"), "--language", "ha",
            "--out", str(out), "--max-steps", str(steps), "--batch-size", "4", "--lr", "1e-3",
            "--eval-limit", "3", "--save-every", "1", "--cache-dir", str(corpus / "cache")]


def ranks(args: list[str], tmp: Path, n: int = 2) -> list[subprocess.Popen]:
    """Start ``n`` ranks by hand, as mlx.launch does for the ring backend on one host."""
    hostfile = tmp / f"ring-{free_port()}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(n)]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_BALDWHISPER_PEER_TIMEOUT": "20"}
    return [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**env, "MLX_RANK": str(r)}) for r in range(n)]


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:  # never leave a rank behind
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, err) for p, err in zip(procs, errs)]


def final_weights(run: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(latest_checkpoint(run) / "model.safetensors")).items()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)
    assert worst < 1e-5, worst


@pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")
def test_two_ranks_equal_one_process_and_survive_a_killed_rank(corpus, tmp_path):
    steps = 6
    one = subprocess.run([sys.executable, *finetune_args(corpus, corpus / "one", steps)],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr

    # the README's way: mlx.launch, ring backend, both ranks on this host
    two = subprocess.run([LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(free_port()),
                          "--", sys.executable, *finetune_args(corpus, corpus / "two", steps)],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("best dev WER") == 1  # rank 0 alone reports
    assert_same_weights(corpus / "one.run", corpus / "two.run")
    assert json.loads((corpus / "two" / "config.json").read_text())["training"][-1]["max_steps"] == steps

    # kill -9 one rank mid-run: the other stops with a clear message, the relaunch resumes
    args = finetune_args(corpus, corpus / "killed", steps)
    procs = ranks(args, tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        found = latest_checkpoint(corpus / "killed.run")
        if found is not None and int(found.name.split("-")[1]) >= 2:
            break
        assert procs[0].poll() is None, procs[0].communicate()[1]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    (code0, err0), (code1, _) = finish(procs, timeout=60)
    assert code1 == -signal.SIGKILL
    assert code0 == 1 and "another training process stopped" in err0, err0[-2000:]
    assert all(code == 0 for code, _ in finish(ranks(args, tmp_path))), "relaunch failed"
    assert_same_weights(corpus / "two.run", corpus / "killed.run")


def test_a_silent_peer_stops_the_group_within_the_timeout(tmp_path):
    code = ("import time; from mlx_baldwhisper.training import distributed as d\n"
            "if d.rank() == 1: time.sleep(60)\n"
            "else: d.barrier()\n")
    procs = ranks(["-c", code], tmp_path)
    start = time.monotonic()
    err = procs[0].communicate(timeout=120)[1]
    procs[1].kill()
    assert procs[0].returncode == 1 and "no answer from the group in 20 s" in err, err
    assert time.monotonic() - start < 60


def test_shards_are_strided_rows():
    from mlx_baldwhisper.training.distributed import shard

    batch = {"inputs": np.arange(10).reshape(5, 2), "mask": np.ones((5, 2)), "note": "x"}
    parts = [shard(batch, r, 2) for r in range(2)]
    assert parts[0]["inputs"][:, 0].tolist() == [0, 4, 8] and parts[1]["inputs"][:, 0].tolist() == [2, 6]
    assert parts[1]["note"] == "x" and len(parts[1]["mask"]) == 2


def test_a_rank_other_than_0_ends_without_the_results_rank_0_writes(corpus, tmp_path, monkeypatch):
    """Ranks share the stages but only rank 0 scores long form and writes results.md: a
    recipe whose stages leave rank 1 done first (the removal baseline alone) must not make
    rank 1 fail reading a file that is not there yet."""
    from click.testing import CliRunner

    from mlx_baldwhisper.cli import main
    from mlx_baldwhisper.training import distributed
    from mlx_baldwhisper.training.recipe import Recipe

    monkeypatch.setattr(Recipe, "run", lambda self: {"stages": {}})
    args = ["recipe", "--train", str(corpus / "train.tsv"), "--dev", str(corpus / "dev.tsv"),
            "--language", "ha", "--out", str(tmp_path / "run"), "--stages", "removed"]
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    assert not (tmp_path / "run" / "results.md").exists()
    monkeypatch.setattr(distributed, "is_main", lambda: True)  # rank 0 reads what it wrote
    assert CliRunner().invoke(main, args).exit_code != 0
