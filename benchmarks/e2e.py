#!/usr/bin/env python
"""End-to-end transcription time, side by side: our models vs. mlx-whisper and faster-whisper.

    python benchmarks/e2e.py --model base --model merged-r96=mlx_models/base-bald96 --json out.json

Audio: the 5 shared English clips (``../shared/data/english``), each transcribed as its
own call, and one long file (the clips joined with 1 s of silence, twice: > 60 s).
Every engine gets the same 16 kHz float32 arrays (file decoding is not timed), greedy
decoding at temperature 0 with no fallback, ``language="en"`` (``--language``),
``condition_on_previous_text=True``. Model loading and one warm-up call are not timed;
each figure is the best of ``--repeats`` runs.

Peers (optional imports, skipped with a note when not installed) run the *same*
whisper-base weights: for mlx-whisper 0.4.3 our embedded weights are written into a
temporary folder in its format (config.json + weights.safetensors, same parameter
names); for faster-whisper 1.2.1 the embedded CTranslate2 model (model.bin shipped in
two parts) is joined into a temporary folder, float32 on the CPU.

Reported per engine: seconds for the 5 clips and for the long file, real-time factor
(seconds of compute per second of audio), and whether its greedy tokens equal ours
(base) and faster-whisper's shipped reference (``reference_faster_whisper_base.json``).
The last line printed is JSON.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import click
import numpy as np

import mlx_baldwhisper  # noqa: F401  before mlx.core: selects the optimised BLAS on Linux

SR = 16000
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "english"


# ---- audio -----------------------------------------------------------------------------

def load_clips(folder: Path, limit: Optional[int] = None) -> dict[str, np.ndarray]:
    """The .flac files of a folder, or the first ``limit`` clips of a manifest (TSV/CSV/JSONL)."""
    from mlx_baldwhisper.audio import load_audio

    if folder.is_file():
        from mlx_baldwhisper.dataset import read_manifest

        files = [Path(x.audio) for x in read_manifest(str(folder))][:limit]
    else:
        files = sorted(folder.glob("*.flac"))[:limit]
    if not files:
        raise click.ClickException(f"no clips in {folder}")
    return {f.name: np.asarray(load_audio(str(f)), dtype=np.float32) for f in files}


def long_file(clips: dict[str, np.ndarray], repeat: int = 2, gap_s: float = 1.0) -> np.ndarray:
    gap = np.zeros(int(gap_s * SR), np.float32)
    parts = []
    for _ in range(repeat):
        for a in clips.values():
            parts += [a, gap]
    return np.concatenate(parts[:-1])


# ---- engines: each returns a callable audio -> {"text", "tokens"} ------------------------

def _text_tokens_from_segments(segments) -> list[int]:
    return [int(t) for s in segments for t in s["tokens"]]


def ours(model_path: Optional[str], dtype: str = "float32", batch: bool = False,
         language: str = "en", audio_context: Optional[str] = None):
    from mlx_baldwhisper import load_model, transcribe

    model = load_model(model_path, dtype=dtype)

    def run(audio):
        items = audio if isinstance(audio, list) else [audio]
        results = transcribe(items, path_or_hf_repo=model, temperature=0.0, language=language,
                             condition_on_previous_text=True, batch_size=8 if batch else 1,
                             audio_context=audio_context)
        out = [{"text": r["text"], "tokens": _text_tokens_from_segments(r["segments"])}
               for r in results]
        return out if isinstance(audio, list) else out[0]

    return run


def mlx_whisper_folder(tmp: Path) -> Path:
    """Our embedded whisper-base weights in mlx-whisper's folder format."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_baldwhisper import load_model

    model = load_model(None)
    d = model.dims.to_dict()
    d.pop("embedding_rank", None)
    d.pop("embedding_exact_rows", None)
    folder = tmp / "mlx-whisper-base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**d, "model_type": "whisper"}))
    mx.save_safetensors(str(folder / "weights.safetensors"), dict(tree_flatten(model.parameters())))
    return folder


def mlx_whisper_engine(tmp: Path, language: str = "en"):
    import mlx.core as mx
    import mlx_whisper
    from mlx_whisper.transcribe import ModelHolder

    folder = str(mlx_whisper_folder(tmp))
    ModelHolder.get_model(folder, mx.float32)  # load once, outside the timing

    def run(audio):
        r = mlx_whisper.transcribe(audio, path_or_hf_repo=folder, temperature=0.0, language=language,
                                   condition_on_previous_text=True, fp16=False)
        return {"text": r["text"], "tokens": _text_tokens_from_segments(r["segments"])}

    return run


def faster_whisper_folder(tmp: Path) -> Path:
    from mlx_baldwhisper.weights import embedded

    src, parts = embedded.folder("base")
    folder = tmp / "faster-whisper-base"
    if folder.exists():  # already joined for another thread count
        return folder
    folder.mkdir()
    with open(folder / "model.bin", "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt", "preprocessor_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return folder


def faster_whisper_engine(tmp: Path, threads: int = 0, language: str = "en"):
    from faster_whisper import WhisperModel

    model = WhisperModel(str(faster_whisper_folder(tmp)), device="cpu", compute_type="float32",
                         cpu_threads=threads)

    def run(audio):
        segments, _ = model.transcribe(audio, beam_size=1, temperature=0.0, language=language,
                                       condition_on_previous_text=True, vad_filter=False)
        segs = list(segments)
        return {"text": "".join(s.text for s in segs),
                "tokens": [int(t) for s in segs for t in s.tokens]}

    return run


# ---- measuring ---------------------------------------------------------------------------

def measure(run: Callable, clips: dict[str, np.ndarray], long: np.ndarray, repeats: int,
            batched: bool = False) -> dict[str, Any]:
    run(clips[next(iter(clips))][: 5 * SR])  # warm-up (allocations, lazy imports)
    best_clips = best_long = float("inf")
    outs: dict[str, Any] = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        if batched:
            results = run(list(clips.values()))
            outs.update(zip(clips, results))
        else:
            for name, audio in clips.items():
                outs[name] = run(audio)
        best_clips = min(best_clips, time.perf_counter() - t0)
        t0 = time.perf_counter()
        outs["long"] = run(long)
        best_long = min(best_long, time.perf_counter() - t0)
    return {"clips_s": best_clips, "long_s": best_long, "outputs": outs}


def reference_tokens(folder: Path) -> dict[str, list[int]]:
    path = folder / "reference_faster_whisper_base.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())["clips"]
    return {name: [int(t) for s in c["segments"] for t in s["tokens"]] for name, c in data.items()}


def same(a: dict, b: dict, keys) -> Optional[bool]:
    keys = [k for k in keys if k in a and k in b]
    if not keys:
        return None
    return all(a[k] == b[k] for k in keys)


def machine() -> dict[str, Any]:
    import mlx.core as mx

    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mlx": mx.__version__,
            "device": str(mx.default_device()), "blas": mlx_baldwhisper.BLAS,
            "platform": platform.platform(), "load_avg": os.getloadavg()}


@click.command()
@click.option("--model", "models", multiple=True,
              help="NAME=PATH of one of our models (repeatable; PATH 'base' = embedded), "
                   "optionally NAME=PATH@CONTEXT to override its audio context (full, dynamic, "
                   "dynamic:MARGIN, N). Default: base.")
@click.option("--clips", "clips_dir", default=str(SHARED), show_default=True,
              help="A folder of .flac clips, or a manifest (TSV/CSV/JSONL) of any audio.")
@click.option("--limit", default=None, type=int, help="Use only the first N clips.")
@click.option("--language", default="en", show_default=True, help="Language for every engine.")
@click.option("--repeats", default=2, show_default=True)
@click.option("--peers/--no-peers", default=True, help="Also run mlx-whisper and faster-whisper.")
@click.option("--fw-threads", default="0,1", show_default=True,
              help="faster-whisper cpu_threads values to run (0 = its default).")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "float16", "bfloat16"]), help="For our models.")
@click.option("--batched/--no-batched", default=True,
              help="Also time ours base with the 5 clips as one batched call.")
@click.option("--peers-first", is_flag=True,
              help="Run the peers before our models (to see the effect of a changing load).")
@click.option("--baseline", default="base", show_default=True,
              help="Which of our --model names the ratio and token-equality columns compare to.")
@click.option("--json", "json_path", default=None, help="Also write the JSON here.")
def main(models, clips_dir, limit, language, repeats, peers, fw_threads, dtype, batched, peers_first,
         baseline, json_path):
    clips = load_clips(Path(clips_dir), limit)
    long = long_file(clips)
    clips_audio_s = sum(len(a) for a in clips.values()) / SR
    long_audio_s = len(long) / SR
    ref = reference_tokens(Path(clips_dir))
    specs = [m.split("=", 1) if "=" in m else (m, m) for m in (models or ["base"])]

    engines: list[tuple[str, Callable[[], Callable], bool]] = []
    suffix = "" if dtype == "float32" else f" {dtype}"
    for name, path in specs:
        path, _, context = path.partition("@")
        p = None if path == "base" else path
        engines.append((f"ours {name}{suffix}",
                        lambda p=p, c=context or None: ours(p, dtype, language=language, audio_context=c),
                        False))
    if batched and "base" in [n for n, _ in specs]:
        engines.append((f"ours base{suffix}, clips as one batch",
                        lambda: ours(None, dtype, batch=True, language=language), True))
    tmp = Path(tempfile.mkdtemp(prefix="mlxbw-e2e-"))
    notes = []
    if peers:
        try:
            import mlx_whisper  # noqa: F401
            engines.append(("mlx-whisper 0.4.3 base", lambda: mlx_whisper_engine(tmp, language), False))
        except ImportError:
            notes.append("mlx-whisper not installed: skipped (pip install mlx-whisper==0.4.3)")
        try:
            import faster_whisper  # noqa: F401
            for th in [int(t) for t in fw_threads.split(",") if t.strip()]:
                label = "default threads" if th == 0 else f"{th} thread" + ("s" if th > 1 else "")
                engines.append((f"faster-whisper 1.2.1 base ({label})",
                                lambda th=th: faster_whisper_engine(tmp, th, language), False))
        except ImportError:
            notes.append("faster-whisper not installed: skipped (pip install faster-whisper==1.2.1)")
    if peers_first:
        n_ours = len(specs) + (1 if batched and "base" in [n for n, _ in specs] else 0)
        engines = engines[n_ours:] + engines[:n_ours]
    for n in notes:
        print("note:", n, file=sys.stderr)

    rows = []
    base_out = None
    try:
        for label, make, batched in engines:
            print(f"running {label} ...", file=sys.stderr, flush=True)
            try:
                run = make()
                r = measure(run, clips, long, repeats, batched)
            except Exception as e:  # one engine failing must not lose the others' figures
                notes.append(f"{label} failed: {type(e).__name__}: {e}")
                print("note:", notes[-1], file=sys.stderr)
                continue
            outs = r.pop("outputs")
            toks = {k: v["tokens"] for k, v in outs.items()}
            if label == f"ours {baseline}{suffix}":
                base_out = toks
            rows.append({
                "engine": label, **{k: round(v, 3) for k, v in r.items()},
                "clips_rtf": round(r["clips_s"] / clips_audio_s, 4),
                "long_rtf": round(r["long_s"] / long_audio_s, 4),
                "tokens_decoded": {"clips": sum(len(toks[k]) for k in clips), "long": len(toks["long"])},
                "tokens": toks, "texts": {k: v["text"] for k, v in outs.items()},
                "same_as_reference": same(toks, ref, clips),
            })
            del run
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for row in rows:
        row["same_as_ours_base"] = same(row["tokens"], base_out, list(clips) + ["long"]) if base_out else None
    ours_base = next((r for r in rows if r["engine"] == f"ours {baseline}{suffix}"), None)

    def yn(v):
        return "n/a" if v is None else ("yes" if v else "**no**")

    lines = [f"Audio: {len(clips)} clips, {clips_audio_s:.1f} s in all; long file {long_audio_s:.1f} s.",
             "", "| engine | clips (s) | RTF | long file (s) | RTF | vs ours " + baseline + " (clips / long) "
             "| tokens out (clips / long) | greedy tokens = ours " + baseline + " | = faster-whisper reference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = "—"
        if ours_base and r is not ours_base:
            speed = (f"{r['clips_s'] / ours_base['clips_s']:.2f}× / {r['long_s'] / ours_base['long_s']:.2f}× "
                     "time")
        lines.append(f"| {r['engine']} | {r['clips_s']:.2f} | {r['clips_rtf']:.3f} | {r['long_s']:.2f} | "
                     f"{r['long_rtf']:.3f} | {speed} | {r['tokens_decoded']['clips']} / "
                     f"{r['tokens_decoded']['long']} | {yn(r['same_as_ours_base'])} | "
                     f"{yn(r['same_as_reference'])} |")
    print("\n".join(lines))
    for r in rows:
        if r["same_as_ours_base"] is False:
            for k in r["tokens"]:
                if base_out and r["tokens"][k] != base_out.get(k):
                    print(f"  {r['engine']} differs on {k}: {r['texts'][k][:160]!r}", file=sys.stderr)
    result = {"machine": machine(), "clips_audio_s": round(clips_audio_s, 2),
              "long_audio_s": round(long_audio_s, 2), "repeats": repeats, "notes": notes,
              "rows": [{k: v for k, v in r.items() if k not in ("tokens",)} for r in rows]}
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
