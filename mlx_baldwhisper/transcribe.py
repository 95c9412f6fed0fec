"""Long-form transcription: 30-second windows, timestamp-driven seeking, temperature fallback.

Several files are transcribed together: each file is a stream with its own seek
position, and the current windows of all streams are encoded and decoded as one batch.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .audio import (FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE,
                    load_audio, log_mel_spectrogram, pad_or_trim)
from .decoding import DecodingOptions, DecodingResult, decode_features, detect_language, tokenizer_for
from .load import load_model
from .model import Whisper
from .tokenizer import LANGUAGES, language_code

AudioInput = Union[str, os.PathLike, np.ndarray, mx.array]
INPUT_STRIDE = 2  # mel frames per encoder output position
TIME_PRECISION = INPUT_STRIDE * HOP_LENGTH / SAMPLE_RATE  # 0.02 s per timestamp token

_MODELS: dict[tuple[str, str], Whisper] = {}


def _model(path_or_hf_repo, dtype) -> Whisper:
    if isinstance(path_or_hf_repo, Whisper):
        return path_or_hf_repo
    key = (str(path_or_hf_repo), str(dtype))
    if key not in _MODELS:
        _MODELS.clear()  # keep one model in memory, as mlx-whisper does
        _MODELS[key] = load_model(path_or_hf_repo, dtype=dtype)
    return _MODELS[key]


@dataclass
class _Stream:
    """The state of one file being transcribed."""

    mel: mx.array
    content_frames: int
    language: Optional[str]
    tokens: list[int] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)
    seek: int = 0
    prompt_since: int = 0
    last_speech: float = 0.0

    @property
    def done(self) -> bool:
        return self.seek >= self.content_frames


def transcribe(
    audio: Union[AudioInput, Sequence[AudioInput]],
    *,
    path_or_hf_repo: Union[str, os.PathLike, Whisper, None] = None,
    verbose: Optional[bool] = None,
    temperature: Union[float, Sequence[float]] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    compression_ratio_threshold: Optional[float] = 2.4,
    logprob_threshold: Optional[float] = -1.0,
    no_speech_threshold: Optional[float] = 0.6,
    condition_on_previous_text: bool = True,
    initial_prompt: Optional[str] = None,
    word_timestamps: bool = False,
    prepend_punctuations: str = "\"'“¿([{-",
    append_punctuations: str = "\"'.。,，!！?？:：”)]}、",
    dtype: str = "float32",
    batch_size: int = 8,
    **decode_options: Any,
) -> Union[dict[str, Any], list[dict[str, Any]]]:
    """Transcribe one file/array (returns a dict) or a list of them (returns a list).

    The result has ``text``, ``segments`` and ``language`` as in openai-whisper.
    """
    single = not isinstance(audio, (list, tuple))
    items = [audio] if single else list(audio)
    model = _model(path_or_hf_repo, dtype)
    if decode_options.pop("fp16", None):
        warnings.warn("fp16 is chosen when loading: pass dtype='float16'")
    language = language_code(decode_options.pop("language", None),
                             model.extra_config.get("language_tokens"))
    task = decode_options.pop("task", "transcribe")
    if not model.is_multilingual and (language not in (None, "en") or task == "translate"):
        warnings.warn(f"{model.source} is English-only: transcribing as English")
        language, task = "en", "transcribe"
    options = DecodingOptions(task=task, **decode_options)
    temperatures = [temperature] if isinstance(temperature, (int, float)) else list(temperature)
    tokenizer = tokenizer_for(model, language or "en", task)
    initial = tokenizer.encode(" " + initial_prompt.strip()) if initial_prompt else []

    streams = []
    for item in items:
        samples = load_audio(item)
        mel = log_mel_spectrogram(samples, model.dims.n_mels, padding=N_SAMPLES)
        content = max(0, mel.shape[0] - N_FRAMES)
        streams.append(_Stream(mel, content, language, tokens=list(initial)))
    total = sum(s.content_frames for s in streams)
    bar = tqdm(total=total, unit="frames", disable=verbose is not False)
    while not all(s.done for s in streams):
        active = [s for s in streams if not s.done][:batch_size]
        before = [s.seek for s in active]
        _window(model, tokenizer, active, options, temperatures, compression_ratio_threshold,
                logprob_threshold, no_speech_threshold, condition_on_previous_text,
                word_timestamps, prepend_punctuations, append_punctuations, verbose)
        bar.update(sum(min(s.seek, s.content_frames) - b for s, b in zip(active, before)))
    bar.close()
    results = [_result(s, tokenizer) for s in streams]
    return results[0] if single else results


def _result(s: _Stream, tokenizer) -> dict[str, Any]:
    text = tokenizer.decode([t for seg in s.segments for t in seg["tokens"]])
    return {"text": text, "segments": s.segments, "language": s.language or "en"}


def _window(model, tokenizer, streams, options, temperatures, cr_threshold, lp_threshold,
            ns_threshold, condition, word_timestamps, prepend, append, verbose) -> None:
    sizes = [min(N_FRAMES, s.content_frames - s.seek) for s in streams]
    mels = mx.stack([pad_or_trim(s.mel[s.seek:s.seek + n], N_FRAMES, axis=0)
                     for s, n in zip(streams, sizes)])
    features = model.embed_audio(mels.astype(model.dtype))
    undetected = [i for i, s in enumerate(streams) if s.language is None]
    if undetected and model.is_multilingual:
        langs, _ = detect_language(model, features[mx.array(undetected)], tokenizer)
        for i, lang in zip(undetected, langs):
            streams[i].language = lang
            if verbose:
                print(f"Detected language: {LANGUAGES[lang].title()}")
    for s in streams:
        s.language = s.language or "en"
    results = _decode_with_fallback(model, features, streams, options, temperatures,
                                    cr_threshold, lp_threshold, ns_threshold)
    for i, (s, size, result) in enumerate(zip(streams, sizes, results)):
        if ns_threshold is not None and result.no_speech_prob > ns_threshold and not (
                lp_threshold is not None and result.avg_logprob > lp_threshold):
            s.seek += size  # silence: skip the window without emitting text
            continue
        new = _segments(s, size, result, tokenizer)
        if word_timestamps and new:
            from .timing import add_word_timestamps
            add_word_timestamps(new, model, replace(tokenizer, language=s.language),
                                features[i:i + 1], size, prepend, append, s.last_speech)
            words = [w for seg in new for w in seg.get("words", [])]
            if words:
                s.last_speech = words[-1]["end"]
        for seg in new:
            if seg["start"] == seg["end"] or not seg["text"].strip():
                seg["text"], seg["tokens"], seg["words"] = "", [], []
            seg["id"] = len(s.segments)
            s.segments.append(seg)
            if verbose:
                print(f"[{_clock(seg['start'])} --> {_clock(seg['end'])}] {seg['text']}")
        for seg in new:
            s.tokens.extend(seg["tokens"])
        if not condition or result.temperature > 0.5:
            s.prompt_since = len(s.tokens)


def _decode_with_fallback(model, features, streams, options, temperatures, cr_threshold,
                          lp_threshold, ns_threshold) -> list[DecodingResult]:
    """Decode all windows at the first temperature; re-decode only the failures hotter."""
    results: list[Optional[DecodingResult]] = [None] * len(streams)
    pending = list(range(len(streams)))
    for t in temperatures:
        kw = {"temperature": t}
        if t > 0:
            kw.update(beam_size=None, patience=None)
        else:
            kw.update(best_of=None)
        by_lang: dict[str, list[int]] = {}
        for i in pending:
            by_lang.setdefault(streams[i].language, []).append(i)
        failed = []
        for lang, idx in by_lang.items():
            opts = replace(options, language=lang, **kw)
            prompts = [streams[i].tokens[streams[i].prompt_since:] for i in idx]
            feats = features if len(idx) == features.shape[0] else features[mx.array(idx)]
            tk = tokenizer_for(model, lang, options.task)
            for i, r in zip(idx, decode_features(model, feats, opts, tk, prompts)):
                results[i] = r
                too_repetitive = cr_threshold is not None and r.compression_ratio > cr_threshold
                too_unsure = lp_threshold is not None and r.avg_logprob < lp_threshold
                silent = ns_threshold is not None and r.no_speech_prob > ns_threshold
                if (too_repetitive or too_unsure) and not (silent and too_unsure):
                    failed.append(i)
        pending = failed
        if not pending:
            break
    return results  # type: ignore[return-value]


def _segments(s: _Stream, size: int, result: DecodingResult, tokenizer) -> list[dict[str, Any]]:
    """Cut a window's tokens into segments at timestamp pairs and advance the seek."""
    tb = tokenizer.timestamp_begin
    tokens = result.tokens
    offset = s.seek * HOP_LENGTH / SAMPLE_RATE
    is_ts = [t >= tb for t in tokens]
    single_ending = is_ts[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    segs = []

    def add(start: float, end: float, toks: list[int]) -> None:
        segs.append({"seek": s.seek, "start": start, "end": end,
                     "text": tokenizer.decode(toks), "tokens": toks,
                     "temperature": result.temperature, "avg_logprob": result.avg_logprob,
                     "compression_ratio": result.compression_ratio,
                     "no_speech_prob": result.no_speech_prob})

    if cuts:
        if single_ending:
            cuts.append(len(tokens))
        last = 0
        for cut in cuts:
            part = tokens[last:cut]
            add(offset + (part[0] - tb) * TIME_PRECISION, offset + (part[-1] - tb) * TIME_PRECISION, part)
            last = cut
        if single_ending:
            s.seek += size
        else:
            s.seek += (tokens[last - 1] - tb) * INPUT_STRIDE
    else:
        duration = size * HOP_LENGTH / SAMPLE_RATE
        stamps = [t for t in tokens if t >= tb]
        if stamps and stamps[-1] != tb:
            duration = (stamps[-1] - tb) * TIME_PRECISION
        add(offset, offset + duration, tokens)
        s.seek += size
    return segs


def _clock(seconds: float) -> str:
    m, sec = divmod(seconds, 60)
    return f"{int(m):02d}:{sec:06.3f}"
