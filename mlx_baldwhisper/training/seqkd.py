"""Sequence-level knowledge distillation (Kim & Rush, 2016) for the recovery stage.

Token-level KD matches the teacher's next-token distribution under the human
transcript. Sequence-level KD also trains on what the teacher itself writes: its greedy
transcript of each training clip becomes a second target for that clip, drawn in place
of the human one for ``seqkd_prob`` of the clips each epoch. The student then learns the
teacher's mode, errors included, which is what it must reproduce at inference.

As in Distil-Whisper, a transcript far from the human one can be dropped
(``seqkd_max_wer``): the clip then keeps its human target.

The transcripts are decoded once per teacher (greedy, temperature 0, from the cached
encoder features), each process its share of every block of clips, gathered over the
group block by block, and kept beside the feature cache under the teacher's weight hash,
so the stages and search trials of a run, a resumed stage and every process read the
same ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..dataset import TIME_PRECISION, TokenizedExample, timestamped
from ..diskspace import replace_file
from ..evaluate import error_counts, evaluate, normalize
from ..folders import claim_run_folder
from ..model import Whisper
from ..tokenizer import Tokenizer
from . import distributed
from .common import StageData

MAX_BYTES = 4096  # a transcript's UTF-8 bytes in the gather; a longer one keeps the human target
BLOCK = 32  # clips each process decodes between two gathers: keeps the processes in step


def transcripts_path(teacher: Whisper, data: StageData, run: Path) -> Path:
    """Beside the feature cache (shared by every stage and search trial of a run) when it
    is on disk, else in the stage's run folder; named by the teacher's weights."""
    name = f"{weights_fingerprint(teacher)[:16]}-{data.language}.json"
    folder = getattr(data.features, "directory", None)
    return (Path(folder) / "transcripts" if folder is not None else run) / name


def teacher_transcripts(teacher: Whisper, data: StageData, path: Path) -> list[str]:
    """The teacher's greedy transcript of every training clip ("" where it has none),
    read from ``path`` when an earlier run wrote it for this teacher and these clips."""
    names = [it.name for it in data.train]
    key = {"clips": names, "teacher": weights_fingerprint(teacher), "language": data.language}
    saved = _read(path, key)
    # one answer for all processes: each decodes unless every one can read the file
    if distributed.sum_floats([float(saved is not None)])[0] == distributed.size():
        return saved
    texts: list[str] = []
    step = BLOCK * distributed.size()
    bar = tqdm(total=len(names), desc="teacher transcripts", unit="clip", disable=not distributed.is_main())
    for start in range(0, len(names), step):
        block = list(range(start, min(start + step, len(names))))
        mine = block[distributed.rank()::distributed.size()]
        rows = evaluate(teacher, [data.train[i] for i in mine], language=data.language,
                        features=data.features, progress=False)["rows"] if mine else []
        by_name = {r["audio"]: r["hypothesis"] for r in rows}
        texts += _gather({i - start: by_name.get(names[i], "") for i in mine}, len(block))
        bar.update(len(block))
    bar.close()
    if distributed.is_main():
        if path.parent.name == "transcripts":
            path.parent.mkdir(parents=True, exist_ok=True)
        else:
            claim_run_folder(path.parent)
        replace_file(path, json.dumps({**key, "transcripts": texts}, ensure_ascii=False))
    return texts


def _read(path: Path, key: dict) -> Optional[list[str]]:
    try:
        saved = json.loads(path.read_text())
        if all(saved.get(k) == v for k, v in key.items()) and len(saved["transcripts"]) == len(key["clips"]):
            return saved["transcripts"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent, torn or of another teacher: decode again
    return None


def _gather(mine: dict[int, str], n: int) -> list[str]:
    """Every process's transcripts of a block of ``n`` clips, in order: their UTF-8 bytes
    summed over the group (each process fills only its own rows)."""
    if distributed.size() == 1:
        return [mine.get(i, "") if len(mine.get(i, "").encode("utf-8")) <= MAX_BYTES else "" for i in range(n)]
    codes = np.zeros((n, MAX_BYTES), np.int32)
    for i, text in mine.items():
        raw = text.encode("utf-8")
        if len(raw) <= MAX_BYTES:
            codes[i, :len(raw)] = np.frombuffer(raw, np.uint8)
    codes = np.array(distributed.all_sum(mx.array(codes)))
    return [bytes(row[row > 0].astype(np.uint8)).decode("utf-8", errors="replace") for row in codes]


def weights_fingerprint(model: Whisper) -> str:
    """SHA-256 over every weight (names, shapes, dtypes, bytes): transcripts belong to it."""
    from mlx.utils import tree_flatten

    h = hashlib.sha256()
    for name, w in tree_flatten(model.parameters()):
        w = mx.contiguous(w)
        mx.eval(w)
        h.update(f"\n{name} {w.dtype} {tuple(w.shape)}\n".encode())
        h.update(memoryview(w).cast("B"))
    return h.hexdigest()


def pseudo_labelled(items: Sequence[TokenizedExample], transcripts: Sequence[str], tokenizer: Tokenizer,
                    max_wer: Optional[float] = None, max_tokens: int = 224
                    ) -> list[Optional[TokenizedExample]]:
    """Each clip with the teacher's transcript as its target (same prompt, and the same
    timestamped segment end), or None where the transcript is empty, too long, or further
    than ``max_wer`` from the human one."""
    out: list[Optional[TokenizedExample]] = []
    for it, text in zip(items, transcripts):
        ids = tokenizer.encode(" " + text.strip()) if text.strip() else []
        if not ids or len(ids) + 3 > max_tokens or (
                max_wer is not None and _wer(it.text, text) > max_wer):
            out.append(None)
            continue
        prompt = [int(t) for t in it.tokens[:it.prompt_length]]
        stamped = None
        if it.timestamp_tokens is not None:  # [..prompt, <|0.00|>, text, <|end|>, eot]
            end = (int(it.timestamp_tokens[-2]) - tokenizer.timestamp_begin) * TIME_PRECISION
            stamped = np.array(timestamped(tokenizer, prompt, ids, end), np.int32)
        out.append(TokenizedExample(it.audio, text.strip(), it.language, it.mel,
                                    np.array(prompt + ids + [tokenizer.eot], np.int32),
                                    it.prompt_length, it.duration, stamped))
    return out


def _wer(reference: str, hypothesis: str) -> float:
    ref = normalize(reference)
    if not ref:
        return float("inf")
    counts = error_counts([ref], [normalize(hypothesis)])
    return counts["word_errors"] / max(counts["words"], 1)


def kept_share(labels: Sequence[Optional[TokenizedExample]]) -> float:
    """The share of clips with a usable teacher transcript (for the run's log and record)."""
    return sum(x is not None for x in labels) / max(len(labels), 1)
