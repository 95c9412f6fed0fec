#!/usr/bin/env python
"""Peak memory of transcribe(): many short files in one call, and one long file (issue 16, item 7).

    python benchmarks/memory.py --model tiny.en --counts 50,500 --minutes 10,120 --json memory.json
    python benchmarks/memory.py --counts 50 --minutes 10    # whisper-base: slower (see RESULTS.md)

Inputs are built once in ``--workdir`` (default /tmp/membench) from the shared English
clips (``../shared/data/english``, 2-11 s each): N short files (the clips in turn, one
file each) and long files of M minutes (the clips joined with 0.5 s of silence, over and
over). Each measurement runs in a fresh Python process, which loads the model (default:
the embedded whisper-base), reads its VmHWM (peak resident set, /proc/self/status), then
transcribes the inputs in ONE ``transcribe()`` call (``language="en"``, greedy at
temperature 0 with no fallback, ``batch_size`` 8, ``verbose=None``) and reads VmHWM again.
VmHWM is reset after loading (``/proc/self/clear_refs``), so the loading's own peak cannot
hide the transcription's. Reported per case: peak RSS during the call, RSS of the loaded
model before it, the difference, audio seconds, wall seconds.
The last line printed is JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

ENGLISH = Path(__file__).resolve().parents[2] / "shared" / "data" / "english"
SR = 16000
GAP = 0.5  # seconds of silence between clips in a long file


def _status_mb(field: str) -> float:
    """VmHWM (peak resident set) or VmRSS (now) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0), so that the model loading's
    own peak does not hide the transcription's."""
    Path("/proc/self/clear_refs").write_text("5")


def _clips() -> list[np.ndarray]:
    from mlx_baldwhisper.audio import load_audio

    paths = sorted(ENGLISH.glob("*.flac"))
    if not paths:
        raise click.ClickException(f"no clips in {ENGLISH}")
    return [load_audio(str(p)) for p in paths]


def _prepare(workdir: Path, n_files: int, minutes: list[int]) -> None:
    """Write the short files and the long files that are not there yet (16-bit WAV)."""
    import soundfile as sf

    clips = None
    workdir.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        path = workdir / f"short_{k:04d}.wav"
        if not path.exists():
            clips = clips or _clips()
            sf.write(path, clips[k % len(clips)], SR, subtype="PCM_16")
    for m in minutes:
        path = workdir / f"long_{m}min.wav"
        if path.exists():
            continue
        clips = clips or _clips()
        gap = np.zeros(int(GAP * SR), np.float32)
        left, k = m * 60 * SR, 0
        with sf.SoundFile(str(path) + ".tmp", "w", SR, 1, "PCM_16", format="WAV") as f:
            while left > 0:  # written piece by piece: the parent never holds the whole file
                piece = np.concatenate([clips[k % len(clips)], gap])[:left]
                f.write(piece)
                left, k = left - len(piece), k + 1
        Path(str(path) + ".tmp").rename(path)


def _inputs(workdir: Path, case: str) -> list[str]:
    kind, value = case.split(":")
    if kind == "files":
        return [str(workdir / f"short_{k:04d}.wav") for k in range(int(value))]
    return [str(workdir / f"long_{value}min.wav")]


def _measure(workdir: Path, case: str, model: str | None, language: str, batch_size: int) -> dict:
    """One case, in this (fresh) process."""
    import soundfile as sf

    from mlx_baldwhisper.load import load_model
    from mlx_baldwhisper.transcribe import transcribe

    paths = _inputs(workdir, case)
    audio_s = sum(sf.info(p).duration for p in paths)
    loaded = load_model(model) if model else load_model()
    load_peak, model_mb = _status_mb("VmHWM"), _status_mb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    results = transcribe(paths, path_or_hf_repo=loaded, language=language, temperature=0.0,
                         batch_size=batch_size, verbose=None)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    return {"case": case, "files": len(paths), "audio_s": round(audio_s, 1),
            "peak_mb": round(peak, 1), "model_mb": round(model_mb, 1), "load_peak_mb": round(load_peak, 1),
            "over_model_mb": round(peak - model_mb, 1), "wall_s": round(seconds, 1),
            "segments": sum(len(r["segments"]) for r in results if r),
            "chars": sum(len(r["text"]) for r in results if r)}


@click.command()
@click.option("--counts", default="50,500", show_default=True,
              help="Numbers of short files, each number one transcribe() call.")
@click.option("--minutes", default="10,120", show_default=True, help="Long files' lengths.")
@click.option("--model", default=None, help="Model path or name (default: embedded whisper-base).")
@click.option("--language", default="en", show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--workdir", default="/tmp/membench", show_default=True, type=click.Path(path_type=Path))
@click.option("--timeout", default=1800.0, show_default=True, help="Seconds allowed per case.")
@click.option("--json", "json_out", default=None, type=click.Path(path_type=Path))
@click.option("--measure", default=None, hidden=True, help="Internal: run one case here.")
def main(counts: str, minutes: str, model: str | None, language: str, batch_size: int,
         workdir: Path, timeout: float, json_out: Path | None, measure: str | None) -> None:
    if measure:
        print(json.dumps(_measure(workdir, measure, model, language, batch_size)))
        return
    ns = [int(n) for n in counts.split(",") if n.strip()]
    ms = [int(m) for m in minutes.split(",") if m.strip()]
    _prepare(workdir, max(ns, default=0), ms)
    rows: list[dict[str, Any]] = []
    for case in [f"files:{n}" for n in ns] + [f"long:{m}" for m in ms]:
        cmd = [sys.executable, __file__, "--measure", case, "--language", language,
               "--batch-size", str(batch_size), "--workdir", str(workdir)]
        cmd += ["--model", model] if model else []
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            click.echo(f"{case}: over {timeout:.0f} s, skipped", err=True)
            continue
        if out.returncode != 0:
            click.echo(f"{case}: failed\n{out.stderr[-2000:]}", err=True)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        click.echo(f"{case}: peak {row['peak_mb']:.0f} MB ({row['over_model_mb']:+.0f} over the "
                   f"loaded model), {row['audio_s']:.0f} s of audio in {row['wall_s']:.0f} s", err=True)
    click.echo("\n| case | files | audio (s) | peak RSS (MB) | model loaded (MB) | peak over model (MB) | wall (s) |")
    click.echo("|---|---|---|---|---|---|---|")
    for r in rows:
        click.echo(f"| {r['case']} | {r['files']} | {r['audio_s']:.0f} | {r['peak_mb']:.0f} | "
                   f"{r['model_mb']:.0f} | {r['over_model_mb']:.0f} | {r['wall_s']:.0f} |")
    if json_out:
        json_out.write_text(json.dumps(rows, indent=1))
    click.echo(json.dumps(rows))


if __name__ == "__main__":
    main()
