"""``transcribe(..., chunking="vad")``: cut at silences, decode the chunks in batches.

The fallback for long files that needs no timestamp tokens, as faster-whisper's batched
pipeline does with Silero VAD: ``vad.chunks`` cuts each recording into spans of at most
30 s at pauses, every span is decoded on its own (without timestamps, and without the
previous text as prompt, so spans of several files share batches; an initial prompt is
given to each), and each span becomes one segment timed by its cut points. A span is featurised like a training clip
(its own samples zero-padded to 30 s), which is what a model fine-tuned on clips knows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .audio import (HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, AudioError, load_audio,
                    log_mel_spectrogram, pad_or_trim)
from .audio_context import AudioContext, encode_windows
from .decoding import DecodingOptions, DecodingResult, decode_with_fallback, detect_language
from .model import Whisper
from .tokenizer import LANGUAGES, Tokenizer
from .vad import VadOptions, chunks
from .writers import format_timestamp

CHUNKING = ("sequential", "vad")  # sequential: openai-whisper's timestamp-driven seeking


def check_chunking(chunking: str, word_timestamps: bool = False,
                   clip_timestamps: Any = "0") -> None:
    """A clear error for an unknown mode, or for options the VAD path cannot honour."""
    if chunking not in CHUNKING:
        raise ValueError(f"chunking must be one of {', '.join(CHUNKING)}, not {chunking!r}")
    if chunking == "vad" and word_timestamps:
        raise ValueError("word_timestamps needs chunking='sequential' (VAD chunks are decoded "
                         "without timestamps)")
    if chunking == "vad" and not _whole_file(clip_timestamps):
        raise ValueError("clip_timestamps needs chunking='sequential'")


def _whole_file(clip_timestamps: Any) -> bool:
    """True for the default "0" (from the start to the end); a malformed value is left to
    transcribe()'s own parser to report."""
    try:
        points = ([float(t) for t in clip_timestamps.split(",") if t.strip()]
                  if isinstance(clip_timestamps, str) else [float(t) for t in clip_timestamps])
    except (TypeError, ValueError):
        return True
    return points in ([], [0.0])


@dataclass
class _Span:
    """One chunk of one input: where it lies (samples) and what became of it."""

    item: int
    start: int
    end: int
    result: Optional[DecodingResult] = None


def transcribe_vad(model: Whisper, items: Sequence[Any], tokenizer: Tokenizer,
                   options: DecodingOptions, language: Optional[str],
                   temperatures: Sequence[float], cr_threshold: Optional[float],
                   lp_threshold: Optional[float], ns_threshold: Optional[float],
                   prompt: list[int], batch_size: int, verbose: Optional[bool],
                   on_audio_error: Optional[Callable[[Any, AudioError], None]],
                   vad: VadOptions = VadOptions(), context: AudioContext = AudioContext()
                   ) -> list[Optional[dict[str, Any]]]:
    """Results as ``transcribe()``'s (text, segments, language), one per input (None for
    an input that failed to load and went to ``on_audio_error``). The language, when not
    given, is detected once per input, on its first chunk. Inputs are loaded in order as
    the batch has room, and each one's samples are dropped once its chunks are decoded."""
    names = _names(items)
    results: list[Optional[dict[str, Any]]] = [None] * len(items)
    audio: dict[int, np.ndarray] = {}
    spans: dict[int, list[_Span]] = {}
    left: dict[int, int] = {}
    languages: list[Optional[str]] = [language if model.is_multilingual else "en"] * len(items)
    options = replace(options, without_timestamps=True)
    todo = iter(enumerate(items))
    pending: list[_Span] = []
    bar = tqdm(total=0, unit="chunk", disable=verbose is not False)

    def finish(i: int) -> None:
        results[i] = _result(spans.pop(i), languages[i] or "en", tokenizer, lp_threshold, ns_threshold)
        audio.pop(i, None)

    while True:
        while len(pending) < batch_size and (nxt := next(todo, None)) is not None:
            i, item = nxt
            try:
                audio[i] = load_audio(item)
            except AudioError as e:
                if on_audio_error is None:
                    raise
                on_audio_error(item, e)
                continue
            spans[i] = [_Span(i, a, b) for a, b in chunks(audio[i], vad)]
            left[i] = len(spans[i])
            pending += spans[i]
            bar.total += len(spans[i])
            if not spans[i]:
                finish(i)  # no speech found: an empty transcript
        if not pending:
            break
        batch, pending = pending[:batch_size], pending[batch_size:]
        features, lengths = _encode(model, [audio[s.item][s.start:s.end] for s in batch], context)
        _detect(model, features, lengths, batch, languages, tokenizer, verbose, names)
        langs = [languages[s.item] or "en" for s in batch]
        prompts = [list(prompt) for _ in batch] if prompt else None
        for s, r in zip(batch, decode_with_fallback(model, features, langs, prompts, options,
                                                    temperatures, cr_threshold, lp_threshold,
                                                    ns_threshold, lengths)):
            s.result = r
            if verbose and _spoken(r, lp_threshold, ns_threshold):
                print(f"{names[s.item] + ': ' if len(items) > 1 else ''}"
                      f"[{format_timestamp(s.start / SAMPLE_RATE)} --> "
                      f"{format_timestamp(s.end / SAMPLE_RATE)}] {r.text}")
            left[s.item] -= 1
            if not left[s.item]:
                finish(s.item)
        bar.update(len(batch))
    bar.close()
    return results


def _names(items: Sequence[Any]) -> list[str]:
    return [os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"audio {i}" for i, x in enumerate(items)]


def _encode(model: Whisper, chunks: list[np.ndarray], context: AudioContext
            ) -> tuple[mx.array, Optional[list[int]]]:
    """Encode chunks (each zero-padded to 30 s, as a training clip) in one batch; over a
    short audio context, each over its own positions (the mel past its audio zeroed, as
    the feature cache does). Returns the features and the positions when they differ."""
    mels = [log_mel_spectrogram(pad_or_trim(c, N_SAMPLES), model.dims.n_mels) for c in chunks]
    ctx = model.dims.n_audio_ctx
    if context.is_full:
        return encode_windows(model, mels, [ctx] * len(mels))
    frames = [max(1, min(N_FRAMES, -(-len(c) // HOP_LENGTH))) for c in chunks]
    return encode_windows(model, mels, [context.positions_for(n, ctx) for n in frames], frames)


def _detect(model: Whisper, features: mx.array, lengths: Optional[list[int]], batch: list[_Span],
            languages: list[Optional[str]], tokenizer: Tokenizer, verbose: Optional[bool],
            names: list[str]) -> None:
    """Detect the language of inputs whose first chunk is in this batch."""
    first = {}
    for k, s in enumerate(batch):
        if languages[s.item] is None and s.item not in first:
            first[s.item] = k
    if not first:
        return
    rows = list(first.values())
    found, _ = detect_language(model, features[mx.array(rows)], tokenizer,
                               None if lengths is None else [lengths[k] for k in rows])
    for item, lang in zip(first, found):
        languages[item] = lang
        if verbose is not None:
            tqdm.write(f"{names[item] + ': ' if len(names) > 1 else ''}"
                       f"Detected language: {LANGUAGES[lang].title()}")


def _spoken(r: DecodingResult, lp_threshold: Optional[float], ns_threshold: Optional[float]) -> bool:
    """transcribe()'s silence rule: likely no speech and, if measured, an unsure decode."""
    silent = ns_threshold is not None and r.no_speech_prob > ns_threshold
    return not (silent and (lp_threshold is None or r.avg_logprob < lp_threshold))


def _result(spans: list[_Span], language: str, tokenizer: Tokenizer, lp_threshold: Optional[float],
            ns_threshold: Optional[float]) -> dict[str, Any]:
    """One segment per spoken chunk, timed by its cut points; text stitched in order."""
    segments = []
    for s in spans:
        r = s.result
        if r is None or not _spoken(r, lp_threshold, ns_threshold) or not r.text.strip():
            continue
        tokens = [t for t in r.tokens if t < tokenizer.eot]
        segments.append({"id": len(segments), "seek": s.start * 100 // SAMPLE_RATE,
                         "start": round(s.start / SAMPLE_RATE, 3), "end": round(s.end / SAMPLE_RATE, 3),
                         "text": tokenizer.decode(tokens), "tokens": tokens, "temperature": r.temperature,
                         "avg_logprob": r.avg_logprob, "compression_ratio": r.compression_ratio,
                         "no_speech_prob": r.no_speech_prob})
    text = tokenizer.decode([t for seg in segments for t in seg["tokens"]])
    return {"text": text, "segments": segments, "language": language}
