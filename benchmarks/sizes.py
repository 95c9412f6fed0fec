#!/usr/bin/env python
"""Sizes of the BaldWhisper variants of whisper-base, measured by converting each one.

For base, merged (3 decoder layers), merged + rank 128 and merged + rank 96, each in
float16 and with 8-bit and 4-bit MLX quantization (group 64): parameters in both
conventions and megabytes on disk (weights file and whole folder, tokenizer included).

Parameter conventions: "stored" counts the arrays in the folder. The encoder's sinusoidal
positions (n_audio_ctx × d = 1500 × 512 = 0.77M for base) are computed, not stored, so
"conventional" adds them back; that is how whisper-base is usually quoted as 72.6M (and
how the paper's 73M/38M count). Quantization packs weights but does not change the count.

With ``--quality`` each folder is reloaded and scored on the 5 English clips: teacher-forced
cross-entropy and token accuracy of the reference transcripts, and greedy WER (at most 96
tokens per clip, twice the longest reference). This is what
quantization (and the surgery, before any recovery training) costs in accuracy.

    python benchmarks/sizes.py [--quality] [--out /tmp/sizes]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import click

import mlx_baldwhisper  # noqa: F401  before mlx.core: selects the optimised BLAS on Linux

VARIANTS = [("base", {}), ("merged", {"merge": True}),
            ("merged + rank 128", {"merge": True, "rank": 128}),
            ("merged + rank 96", {"merge": True, "rank": 96})]
PRECISIONS = [("float16", {}), ("8-bit", {"quantize": True, "q_bits": 8}),
              ("4-bit", {"quantize": True, "q_bits": 4})]


def mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f}"


def quality(folder: Path) -> dict:
    """Teacher-forced CE / token accuracy and greedy WER on the English clips."""
    import mlx.core as mx

    from mlx_baldwhisper import load_model
    from mlx_baldwhisper.decoding import DecodingOptions
    from mlx_baldwhisper.evaluate import evaluate
    from mlx_baldwhisper.dataset import read_manifest

    sys.path.insert(0, str(Path(__file__).parent))
    from merge_alpha import DATA, reference_set, score

    model = load_model(str(folder))
    mel, texts = reference_set(DATA, model.dims.n_mels)
    feats = model.embed_audio(mel)
    mx.eval(feats)
    ce, acc = score(model, feats, texts)
    # 96 tokens is twice the longest reference: enough, and a broken model stops sooner
    options = DecodingOptions(without_timestamps=True, temperature=0.0, sample_len=96)
    wer = evaluate(model, read_manifest(DATA / "transcripts.tsv", language="en"), options=options)["wer"]
    return {"ce": ce, "accuracy": acc, "wer": wer}


def measure(out: Path, group_size: int, with_quality: bool = False) -> list[dict]:
    from mlx_baldwhisper.convert import convert
    from mlx_baldwhisper.surgery import Surgery
    from mlx_baldwhisper.weights import mlx_folder

    rows = []
    for name, surgery in VARIANTS:
        for precision, q in PRECISIONS:
            s = Surgery(**surgery, **q, q_group_size=group_size)
            folder = out / f"{name}-{precision}".replace(" ", "").replace("+", "-")
            model = convert(None, str(folder), "float16", s, force=True, log=lambda *_: None)
            stored = sum(p for p, _ in s.report["after"].values())
            fixed = model.dims.n_audio_ctx * model.dims.n_audio_state
            rows.append({
                "model": name, "precision": precision, "stored": stored, "conventional": stored + fixed,
                "weights_bytes": (folder / mlx_folder.WEIGHTS).stat().st_size,
                "folder_bytes": sum(f.stat().st_size for f in folder.iterdir()),
                "relative_error": s.report.get("relative_error"),
                **(quality(folder) if with_quality else {}),
            })
    return rows


def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["model"] == "base")
    q = "ce" in base
    lines = ["| model | precision | params stored | params conventional (+0.77M fixed positions) "
             "| % of base (conventional) | weights file MB | folder MB |"
             + (" CE (nats/token) | token acc. | WER |" if q else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|---|" if q else "")]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {r['stored'] / 1e6:.2f}M "
                     f"| {r['conventional'] / 1e6:.2f}M | {r['conventional'] / base['conventional']:.1%} "
                     f"| {mb(r['weights_bytes'])} | {mb(r['folder_bytes'])} |"
                     + (f" {r['ce']:.3f} | {r['accuracy']:.1%} | {r['wer']:.1%} |" if q else ""))
    errs = {r["model"]: r["relative_error"] for r in rows if r["relative_error"] is not None}
    lines += ["", "| embedding rank | ‖E − AB‖/‖E‖ |", "|---|---|"]
    lines += [f"| {m.split()[-1]} | {e:.4f} |" for m, e in errs.items()]
    return "\n".join(lines)


@click.command()
@click.option("--out", default=None, help="Keep the converted folders here (default: a temporary folder).")
@click.option("--q-group-size", default=64, show_default=True)
@click.option("--quality", is_flag=True, help="Also score every folder on the English clips.")
def main(out: str | None, q_group_size: int, quality: bool):
    tmp = Path(out) if out else Path(tempfile.mkdtemp(prefix="sizes-"))
    try:
        print(table(measure(tmp, q_group_size, quality)))
    finally:
        if out is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
