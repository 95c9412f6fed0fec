"""Word and character error rates of a model on a set of utterances.

Text normalisation (``normalize``), applied to references and hypotheses alike, is
deliberately language-agnostic because the project is scored on languages other than
English; there are no spelling, number or contraction rules:

1. Unicode NFKC (compatibility forms fold: full-width letters, ligatures, ``²`` -> ``2``);
2. lowercase (``str.lower``);
3. apostrophes (``' ’ ‘ ` ´``) are deleted, so "don't" and "dont" match;
4. every other punctuation (Unicode category P*) or symbol (S*) becomes a space;
   letters, marks (M*, e.g. Devanagari vowel signs) and digits are kept;
5. whitespace runs collapse to one space, and the ends are stripped.

WER and CER are corpus-level fractions (0.25 = 25 %) from jiwer over the normalised
texts; CER counts the single spaces between words as characters.

``evaluate_long_form`` scores the same clips joined into minutes-long recordings and
transcribed with ``transcribe()``'s defaults, because a model that reads short clips well
can still drop most of the speech once it has to seek through a long file by itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .audio import N_SAMPLES, SAMPLE_RATE, AudioError
from .decoding import DecodingOptions, decode_features
from .model import Whisper
from .tokenizer import Tokenizer
from .diskspace import replace_file
from .dataset import ClipTooLongError, Example, TokenizedExample, load_mel, load_samples
from .audio_context import AudioContext, Spec, of_model
from .features import FeatureCache, encode_mels, pad_stack, speech_frames

log = logging.getLogger(__name__)

_APOSTROPHES = frozenset("'’‘`´")
LONG_FORM_GAP = 0.5  # seconds of silence between joined clips: a pause between utterances
Item = Union[Example, TokenizedExample]


def normalize(text: str) -> str:
    """Normalise text for WER/CER as described in the module docstring."""
    out = []
    for ch in unicodedata.normalize("NFKC", text).lower():
        if ch in _APOSTROPHES:
            continue
        cat = unicodedata.category(ch)
        out.append(" " if cat[0] in "PS" or ch.isspace() else ch)
    return " ".join("".join(out).split())


def error_counts(refs: list[str], hyps: list[str]) -> dict[str, int]:
    """Word and character edit counts: they add up across shards of a data set, rates don't."""
    import jiwer

    if not refs:
        return {"word_errors": 0, "words": 0, "char_errors": 0, "chars": 0}
    w, c = jiwer.process_words(refs, hyps), jiwer.process_characters(refs, hyps)
    return {"word_errors": w.substitutions + w.deletions + w.insertions,
            "words": w.hits + w.substitutions + w.deletions,
            "char_errors": c.substitutions + c.deletions + c.insertions,
            "chars": c.hits + c.substitutions + c.deletions}


def error_rates(counts: dict[str, float]) -> dict[str, float]:
    """Corpus-level WER and CER (NaN for an empty set)."""
    def rate(errors: float, total: float) -> float:
        return errors / total if total else float("nan")
    return {"wer": rate(counts["word_errors"], counts["words"]),
            "cer": rate(counts["char_errors"], counts["chars"])}


def evaluate(model: Whisper, items: Sequence[Item], language: Optional[str] = None,
             batch_size: int = 8, features: Optional[FeatureCache] = None,
             options: Optional[DecodingOptions] = None, limit: Optional[int] = None,
             tokenizer: Optional[Tokenizer] = None, progress: bool = True,
             audio_context: Spec = None) -> dict[str, Any]:
    """Greedy-decode ``items`` (Examples or prepared items) and score them.

    The language is ``language`` if given, else ``options.language``, else each item's
    own, else detected. ``limit`` keeps the first N items. Clips that cannot be loaded or
    exceed 30 s, and items whose normalised reference is empty, are skipped with a warning
    and listed in ``skipped``. Returns ``wer``, ``cer`` (fractions), ``n``, ``seconds``
    (wall time), ``skipped`` and per-utterance ``rows``. Clips are encoded over the model's
    audio context (``audio_context`` overrides it), or the ``features`` cache's.
    """
    start = time.perf_counter()
    context = of_model(model, audio_context)
    base = options or DecodingOptions(without_timestamps=True, temperature=0.0)
    if language is not None:
        base = replace(base, language=language)
    skipped: list[tuple[str, str]] = []
    todo = []
    for it in list(items)[:limit] if limit is not None else list(items):
        if normalize(it.text):
            todo.append(it)
        else:
            log.warning("skipping %s: empty reference", it.name)
            skipped.append((it.name, "empty reference"))
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(todo), desc="evaluating", unit="clip", disable=not progress)
    for b in range(0, len(todo), batch_size):
        ok, feats, lengths = _batch_features(model, todo[b:b + batch_size], features, skipped,
                                             context)
        langs = [base.language or it.language for it in ok]
        batch_rows: list[dict[str, Any]] = [{} for _ in ok]
        for lang in dict.fromkeys(langs):
            idx = [i for i, l in enumerate(langs) if l == lang]
            audio_features = mx.array(feats[idx]).astype(model.dtype)
            own = None if lengths is None else [lengths[i] for i in idx]
            results = decode_features(model, audio_features, replace(base, language=lang),
                                      tokenizer, audio_lengths=own)
            for i, r in zip(idx, results):
                batch_rows[i] = _row(ok[i], r.text, r.language)
        rows += batch_rows
        bar.update(len(todo[b:b + batch_size]))
    refs = [r["reference_norm"] for r in rows]
    hyps = [r["hypothesis_norm"] for r in rows]
    bar.close()
    counts = error_counts(refs, hyps)
    return {**error_rates(counts), "counts": counts, "n": len(rows),
            "seconds": time.perf_counter() - start, "language": base.language,
            "skipped": [list(s) for s in skipped], "rows": rows}


@dataclass
class Recording:
    """Consecutive clips joined with silent gaps, and their joined transcript."""

    samples: np.ndarray
    text: str
    names: list[str]
    language: Optional[str]

    @property
    def seconds(self) -> float:
        return self.samples.shape[0] / SAMPLE_RATE


def join_clips(items: Sequence[Item], seconds: float, gap: float = LONG_FORM_GAP,
               skipped: Optional[list[tuple[str, str]]] = None) -> list[Recording]:
    """Join consecutive clips (in the given order) into recordings of about ``seconds``:
    clips are added until a recording reaches that length, so each is at most one clip
    longer; the last one holds what is left. A change of language starts a new one.
    Clips that ``evaluate`` would skip (empty reference, unloadable, over 30 s) are left
    out and listed in ``skipped``, so both scores cover the same clips."""
    if seconds <= 0:
        raise ValueError(f"long-form recordings need a positive length, not {seconds}")
    if gap < 0:
        raise ValueError(f"the gap between clips cannot be negative ({gap})")
    skipped = [] if skipped is None else skipped
    silence = np.zeros(int(round(gap * SAMPLE_RATE)), np.float32)
    out: list[Recording] = []
    parts: list[np.ndarray] = []
    texts: list[str] = []
    names: list[str] = []
    language: Optional[str] = None

    def close() -> None:
        if parts:
            joined = [x for p in parts for x in (silence, p)][1:]
            out.append(Recording(np.concatenate(joined), " ".join(texts), list(names), language))
        parts.clear()
        texts.clear()
        names.clear()

    for it in items:
        reason = _unusable(it)
        samples = None
        if reason is None:
            try:
                samples = load_samples(it.audio)
            except AudioError as e:
                reason = str(e)
        if samples is not None and samples.shape[0] > N_SAMPLES:
            reason = f"longer than 30 s ({samples.shape[0] / SAMPLE_RATE:.1f} s)"
        if reason is not None or samples is None:
            log.warning("long form: skipping %s: %s", it.name, reason)
            skipped.append((it.name, str(reason)))
            continue
        if parts and it.language != language:
            close()
        language = it.language
        parts.append(samples)
        texts.append(it.text.strip())
        names.append(it.name)
        if sum(p.shape[0] for p in parts) + gap * SAMPLE_RATE * (len(parts) - 1) >= seconds * SAMPLE_RATE:
            close()
    close()
    return out


def _unusable(it: Item) -> Optional[str]:
    if not normalize(it.text):
        return "empty reference"
    if isinstance(it, TokenizedExample) and not os.path.isfile(it.audio):
        return "its audio is not a file (in-memory clips cannot be joined)"
    return None


def evaluate_long_form(model: Whisper, items: Sequence[Item], seconds: float,
                       language: Optional[str] = None, gap: float = LONG_FORM_GAP,
                       batch_size: int = 4, limit: Optional[int] = None, progress: bool = True,
                       **transcribe_options: Any) -> dict[str, Any]:
    """Join consecutive ``items`` into recordings of about ``seconds`` (``join_clips``) and
    score ``transcribe()`` on them with its defaults (timestamps, temperature fallback,
    conditioning on previous text) unless ``transcribe_options`` say otherwise.

    Text is normalised as in ``evaluate``; the references are the clips' transcripts
    joined with spaces. ``batch_size`` recordings are transcribed together. Returns
    ``wer``, ``cer``, ``counts``, ``n`` (recordings), ``clips``, ``audio_seconds``,
    ``seconds`` (wall time), ``skipped`` and one row per recording.
    """
    from .transcribe import transcribe

    start = time.perf_counter()
    skipped: list[tuple[str, str]] = []
    chosen = list(items)[:limit] if limit is not None else list(items)
    recordings = join_clips(chosen, seconds, gap, skipped)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(recordings), desc="long-form", unit="recording", disable=not progress)
    for b in range(0, len(recordings), batch_size):
        batch = recordings[b:b + batch_size]
        langs = [language or r.language for r in batch]
        texts: list[dict[str, Any]] = [{} for _ in batch]
        for lang in dict.fromkeys(langs):
            idx = [i for i, l in enumerate(langs) if l == lang]
            results = transcribe([batch[i].samples for i in idx], path_or_hf_repo=model,
                                 language=lang, batch_size=len(idx), **transcribe_options)
            for i, r in zip(idx, results):
                texts[i] = r
        for rec, r in zip(batch, texts):
            name = rec.names[0] if len(rec.names) == 1 else f"{rec.names[0]} + {len(rec.names) - 1} more"
            item = Example(name, rec.text, rec.language, key=name)
            rows.append({**_row(item, r["text"], r["language"]), "clips": rec.names,
                         "audio_seconds": round(rec.seconds, 2)})
        bar.update(len(batch))
    bar.close()
    counts = error_counts([r["reference_norm"] for r in rows], [r["hypothesis_norm"] for r in rows])
    return {**error_rates(counts), "counts": counts, "n": len(rows),
            "clips": sum(len(r["clips"]) for r in rows), "target_seconds": seconds, "gap": gap,
            "audio_seconds": round(sum(r["audio_seconds"] for r in rows), 2),
            "seconds": time.perf_counter() - start, "language": language,
            "skipped": [list(s) for s in skipped], "rows": rows}


def _batch_features(model: Whisper, batch: list[Item], cache: Optional[FeatureCache],
                    skipped: list[tuple[str, str]], context: AudioContext
                    ) -> tuple[list[Item], np.ndarray, Optional[list[int]]]:
    """Encoder features for the loadable items of ``batch`` (cached ones are not re-run),
    padded to one length, and each item's positions when they differ. Without a cache,
    clips are encoded over ``context``; a cache encodes over its own."""
    if cache is not None:
        context = cache.context
    ok, feats, missing, mels = [], [], [], []
    for it in batch:
        try:
            samples = None
            # Its duration, when the manifest gave none, sets a short context's length, and
            # with it the cache key: known before the lookup, or the clip is re-encoded.
            if not isinstance(it, TokenizedExample) and getattr(it, "duration", None) is None \
                    and not context.is_full:
                samples = load_samples(it.audio)
                it = replace(it, duration=samples.shape[0] / SAMPLE_RATE)
            if cache is not None and it in cache:
                ok.append(it)
                feats.append(cache.get(it))
                continue
            if isinstance(it, TokenizedExample):
                mel = it.mel
            else:
                samples = load_samples(it.audio) if samples is None else samples
                mel = load_mel((samples, SAMPLE_RATE), model.dims.n_mels)
        except (AudioError, ClipTooLongError) as e:
            log.warning("skipping %s: %s", it.name, e)
            skipped.append((it.name, str(e)))
            continue
        ok.append(it)
        feats.append(None)
        missing.append(len(ok) - 1)
        mels.append(mel)
    if mels:
        positions = frames = None
        if not context.is_full:
            frames = [speech_frames(ok[k]) for k in missing]
            positions = [context.positions_for(n, model.dims.n_audio_ctx) for n in frames]
        for k, f in zip(missing, encode_mels(model, np.stack(mels), positions, frames)):
            feats[k] = f
            if cache is not None:
                cache.put(ok[k], f)
    if not feats:
        return ok, np.zeros((0,)), None
    stacked, lengths = pad_stack(feats)
    return ok, stacked, lengths


def _row(it: Item, hypothesis: str, language: str) -> dict[str, Any]:
    ref_n, hyp_n = normalize(it.text), normalize(hypothesis)
    return {"audio": it.name, "language": language, "reference": it.text, "hypothesis": hypothesis,
            "reference_norm": ref_n, "hypothesis_norm": hyp_n,
            **error_rates(error_counts([ref_n], [hyp_n]))}


def save_hypotheses(result: dict[str, Any], path: Union[str, os.PathLike]) -> list[Path]:
    """Write ``result`` as ``.tsv`` (one row per utterance) or ``.json`` (everything),
    chosen by the extension; any other name gets both ``<path>.tsv`` and ``<path>.json``.
    Each file is replaced whole: a full disk is a DiskFullError naming it, the earlier file kept."""
    p = Path(path)
    targets = [p] if p.suffix in (".tsv", ".json") else [Path(f"{p}.tsv"), Path(f"{p}.json")]
    for t in targets:
        t.parent.mkdir(parents=True, exist_ok=True)
        if t.suffix == ".json":
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                     for k, v in result.items()}
            replace_file(t, json.dumps(clean, ensure_ascii=False, indent=1))
            continue
        cols = ["audio", "language", "reference", "hypothesis", "reference_norm", "hypothesis_norm",
                "wer", "cer"]
        lines = ["\t".join(cols)]  # tabs and newlines inside texts become spaces
        lines += ["\t".join(" ".join(str(r[c]).split()) for c in cols) for r in result["rows"]]
        replace_file(t, "\n".join(lines) + "\n")
    return targets
