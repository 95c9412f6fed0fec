#!/usr/bin/env python
"""Run a training command and record its resident memory every N optimizer steps.

    python benchmarks/rss_trace.py --every 50 --out rss.jsonl -- \
        mlx_baldwhisper finetune --train T --dev D --language ha --out RUN --config CFG

The command's metrics (``OUT.run/metrics.jsonl``, found from its ``--out``) give the
step; /proc gives VmRSS (now) and VmHWM (peak so far) of the process and its children.
One JSON line per crossing of a multiple of --every: step, elapsed seconds, RSS MB,
peak MB. A memory creep shows as RSS rising with the step; the last lines summarise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click


def _kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _last_step(metrics: Path) -> int:
    try:
        with metrics.open("rb") as f:
            f.seek(max(0, metrics.stat().st_size - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return -1
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("kind") == "train":
            return int(row["step"])
    return -1


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--every", default=50, show_default=True, help="Record every N optimizer steps.")
@click.option("--poll", default=2.0, show_default=True, help="Seconds between looks.")
@click.option("--out", "out_file", required=True, help="JSON-lines trace to append to.")
@click.option("--max-seconds", default=0.0, help="Stop the command after this long (0 = never).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def main(every, poll, out_file, max_seconds, command):
    command = list(command)
    run_out = Path(command[command.index("--out") + 1])
    metrics = run_out.with_name(run_out.name + ".run") / "metrics.jsonl"
    proc = subprocess.Popen(command)
    t0, mark = time.time(), -1
    with open(out_file, "a") as trace:
        while proc.poll() is None:
            time.sleep(poll)
            step = _last_step(metrics)
            if step >= 0 and step // every > mark:
                mark = step // every
                row = {"step": step, "elapsed_s": round(time.time() - t0, 1),
                       "rss_mb": round(_kb(proc.pid, "VmRSS") / 1024, 1),
                       "peak_mb": round(_kb(proc.pid, "VmHWM") / 1024, 1)}
                trace.write(json.dumps(row) + "\n")
                trace.flush()
            if max_seconds and time.time() - t0 > max_seconds:
                proc.send_signal(2)  # Ctrl-C: the stage checkpoints and exits 130
                proc.wait()
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
