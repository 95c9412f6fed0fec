"""Long-form transcription: 30-second windows, timestamp-driven seeking, temperature fallback.

Several files are transcribed together: each file is a stream with its own seek
position, and the current windows of all streams are encoded and decoded as one batch.
``clip_timestamps`` and ``hallucination_silence_threshold`` follow openai-whisper.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .audio_context import AudioContext, Spec, encode_windows, of_model
from .audio import (FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, AudioError,
                    load_audio, log_mel_spectrogram)
from .decoding import (DecodingOptions, DecodingResult, decode_with_fallback, detect_language,
                       tokenizer_for)
from .chunked import check_chunking, transcribe_vad
from .vad import VadOptions, speech_frames, vad_options
from .load import load_model
from .model import Whisper
from .tokenizer import LANGUAGES, language_code
from .writers import format_timestamp

AudioInput = Union[str, os.PathLike, np.ndarray, mx.array]
INPUT_STRIDE = 2  # mel frames per encoder output position
TIME_PRECISION = INPUT_STRIDE * HOP_LENGTH / SAMPLE_RATE  # 0.02 s per timestamp token
# A segment whose words score this odd (improbable, clipped or stretched; see _oddness),
# or as odd as it has words, is a likely hallucination.
ODD_SEGMENT_SCORE = 3.0
EDGE_SECONDS = 2.0  # a segment this close to the end of the decoded audio may be cut off
# resume_early_end: a window whose text stops at least EARLY_END_SECONDS before the window
# does, with at least EARLY_END_SPEECH_SECONDS of speech (energy VAD) after the text's last
# timestamp, is decoded again from that timestamp instead of being left behind.
EARLY_END_SECONDS = 1.0
EARLY_END_SPEECH_SECONDS = 0.5

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

    name: str
    mel: mx.array
    content_frames: int
    language: Optional[str]
    clips: list[tuple[int, int]]  # (start, end) frames still to transcribe, in order
    tokens: list[int] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)
    seek: int = 0
    prompt_since: int = 0
    last_speech: float = 0.0
    # With resume_early_end: per 0.02-s step of the audio, whether the energy VAD hears speech.
    speech: Optional[np.ndarray] = None

    @property
    def done(self) -> bool:
        return not self.clips

    @property
    def clip_end(self) -> int:
        return self.clips[0][1]

    @property
    def position(self) -> int:
        """Frames behind us, for the progress bar (all of them once done)."""
        return self.content_frames if self.done else self.seek

    def next_clip(self) -> None:
        """Once the seek passes the current clip's end (a window may overshoot it), go on at
        the start of the next clip; keep the seek inside the current one."""
        if self.clips and self.seek >= self.clips[0][1]:
            self.clips.pop(0)
            if self.clips:
                self.seek = self.clips[0][0]
        elif self.clips:
            self.seek = max(self.seek, self.clips[0][0])


def parse_clip_timestamps(clip_timestamps: Union[str, Sequence[float]]) -> list[float]:
    """openai-whisper's clip list: "start,end,start,end,..." in seconds, the last end optional."""
    try:
        points = ([float(t) for t in clip_timestamps.split(",") if t.strip()]
                  if isinstance(clip_timestamps, str) else [float(t) for t in clip_timestamps])
    except ValueError:
        raise ValueError(
            f"clip_timestamps must be comma-separated seconds, got {clip_timestamps!r}") from None
    if any(not np.isfinite(t) or t < 0 for t in points):
        raise ValueError(f"clip_timestamps must be non-negative seconds, got {clip_timestamps!r}")
    if any(end <= start for start, end in zip(points[::2], points[1::2])):
        raise ValueError(f"each clip must end after it starts: {clip_timestamps!r}")
    return points


def _clips(points: list[float], content_frames: int) -> list[tuple[int, int]]:
    frames = [round(t * FRAMES_PER_SECOND) for t in points] or [0]
    if len(frames) % 2:
        frames.append(content_frames)
    clips = [(start, min(end, content_frames)) for start, end in zip(frames[::2], frames[1::2])]
    return [(start, end) for start, end in clips if start < end]


def transcribe(
    audio: Union[AudioInput, Sequence[AudioInput]],
    *,
    path_or_hf_repo: Union[str, os.PathLike, Whisper, None] = None,
    verbose: Optional[bool] = None,
    temperature: Union[float, Sequence[float]] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    compression_ratio_threshold: Optional[float] = 2.4,
    logprob_threshold: Optional[float] = -1.0,
    no_speech_threshold: Optional[float] = 0.6,
    condition_on_previous_text: Optional[bool] = None,
    initial_prompt: Optional[str] = None,
    word_timestamps: bool = False,
    prepend_punctuations: str = "\"'“¿([{-",
    append_punctuations: str = "\"'.。,，!！?？:：”)]}、",
    clip_timestamps: Union[str, Sequence[float]] = "0",
    hallucination_silence_threshold: Optional[float] = None,
    chunking: str = "sequential",
    vad_parameters: Union[VadOptions, dict[str, Any], None] = None,
    dtype: str = "float32",
    batch_size: int = 8,
    audio_context: Spec = None,
    resume_early_end: Optional[bool] = None,
    on_audio_error: Optional[Callable[[AudioInput, AudioError], None]] = None,
    **decode_options: Any,
) -> Union[Optional[dict[str, Any]], list[Optional[dict[str, Any]]]]:
    """Transcribe one file/array (returns a dict) or a list of them (returns a list).

    The result has ``text``, ``segments`` and ``language`` as in openai-whisper. As there,
    ``verbose=True`` prints each segment as it is decoded, ``False`` shows a progress bar
    instead, ``None`` prints nothing. ``clip_timestamps`` ("start,end,..." seconds) limits
    the audio transcribed; ``hallucination_silence_threshold`` (seconds; needs
    ``word_timestamps``) skips silences around segments that look hallucinated.
    ``chunking="vad"`` cuts each input at silences instead and decodes the chunks in
    batches without timestamps, one segment per chunk (chunked.py, vad.py);
    ``vad_parameters`` (a ``VadOptions`` or a dict of its fields, as faster-whisper's
    option of that name) sets its thresholds, e.g. ``{"max_chunk_seconds": 15}``.
    ``audio_context`` ("full", "dynamic", "dynamic:MARGIN" or a number of encoder
    positions) overrides the model's own policy (audio_context.py; default: its
    config.json's, else full 30-s windows).
    ``condition_on_previous_text``: prompt each window with the text before it. Default:
    the model's config.json (``"long_form": {"condition_on_previous_text": false}`` in models
    trained here), else True, as openai-whisper.
    ``resume_early_end``: when a window's text ends (at a timestamp) at least 1 s before the
    window and the energy VAD hears speech after it, the next window starts at that
    timestamp; openai-whisper moves on after the window and loses that speech. A prompted
    window with no text at all over speech is decoded again without the prompt. Compressed
    fine-tuned models stop early in both ways on long recordings. Default: the model's
    config.json (``"long_form": {"resume_early_end": true}``), else off, as openai-whisper.
    An input that cannot be loaded raises AudioError, or, given ``on_audio_error``, is
    passed to it with the error and gets None as its result while the others go on.
    """
    single = not isinstance(audio, (list, tuple))
    items = [audio] if single else list(audio)
    check_chunking(chunking, word_timestamps, clip_timestamps)
    model = _model(path_or_hf_repo, dtype)
    context = of_model(model, audio_context)
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
    points = parse_clip_timestamps(clip_timestamps)
    policy = model.extra_config.get("long_form", {})  # the model's own long-form settings
    if resume_early_end is None:
        resume_early_end = policy.get("resume_early_end", False)
    if condition_on_previous_text is None:
        condition_on_previous_text = policy.get("condition_on_previous_text", True)
    if hallucination_silence_threshold is not None and not word_timestamps:
        warnings.warn("hallucination_silence_threshold needs word_timestamps=True; ignored")
        hallucination_silence_threshold = None
    if chunking == "vad":  # the VAD path lives in chunked.py
        done = transcribe_vad(model, items, tokenizer, options, language, temperatures,
                              compression_ratio_threshold, logprob_threshold, no_speech_threshold,
                              initial, batch_size, verbose, on_audio_error,
                              vad=vad_options(vad_parameters), context=context)
        return done[0] if single else done

    if verbose and language is None and model.is_multilingual:
        print("Detecting language using up to the first 30 seconds. "
              "Use `--language` to specify the language")
    # Inputs are loaded lazily, in order, as the batch has room: only the batch's streams
    # hold a mel, so memory does not grow with the number of inputs. The bar's total
    # (frames) grows as files are loaded.
    todo = iter(enumerate(items))
    results: list[Optional[dict[str, Any]]] = [None] * len(items)
    batch: list[tuple[int, _Stream]] = []  # (input index, stream), in input order
    bar = tqdm(total=0, unit="frames", disable=verbose is not False)
    while True:
        while len(batch) < batch_size and (nxt := next(todo, None)) is not None:
            s = _stream(*nxt, model, language, points, initial, on_audio_error, resume_early_end)
            if s is not None and s.done:  # nothing to transcribe (clips past its end)
                results[nxt[0]] = _result(s, tokenizer)
            elif s is not None:
                batch.append((nxt[0], s))
                bar.total += s.content_frames
        if not batch:
            break
        active = [s for _, s in batch]
        before = [s.position for s in active]
        _window(model, tokenizer, active, options, temperatures, compression_ratio_threshold,
                logprob_threshold, no_speech_threshold, condition_on_previous_text,
                word_timestamps, prepend_punctuations, append_punctuations,
                hallucination_silence_threshold, verbose, len(items) > 1, context)
        bar.update(sum(s.position - b for s, b in zip(active, before)))
        for i, s in batch:
            if s.done:  # its result now, and its mel freed before more files are loaded
                results[i] = _result(s, tokenizer)
        batch = [(i, s) for i, s in batch if not s.done]
    bar.close()
    return results[0] if single else results


def _stream(i: int, item: AudioInput, model: Whisper, language: Optional[str], points: list[float],
            prompt: list[int], on_audio_error: Optional[Callable],
            resume_early_end: bool = False) -> Optional[_Stream]:
    """Load one input; None if it cannot be and ``on_audio_error`` takes the error."""
    try:
        samples = load_audio(item)
    except AudioError as e:
        if on_audio_error is None:
            raise
        on_audio_error(item, e)
        return None
    mel = log_mel_spectrogram(samples, model.dims.n_mels, padding=N_SAMPLES)
    content = max(0, mel.shape[0] - N_FRAMES)
    name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"audio {i}"
    s = _Stream(name, mel, content, language, _clips(points, content), tokens=list(prompt),
                speech=speech_frames(samples) if resume_early_end else None)
    s.next_clip()
    return s


def _result(s: _Stream, tokenizer) -> dict[str, Any]:
    """A finished stream's result; its mel is dropped at once (a 2-h file's is 230 MB)."""
    s.mel = mx.zeros((0, s.mel.shape[1]), dtype=s.mel.dtype)
    text = tokenizer.decode([t for seg in s.segments for t in seg["tokens"]])
    return {"text": text, "segments": s.segments, "language": s.language or "en"}


def _encode_windows(model: Whisper, streams: list[_Stream], context: AudioContext
                    ) -> tuple[list[int], mx.array, Optional[list[int]]]:
    """Each stream's next window, encoded in one batch: (audio frames per window, features,
    encoder positions per window, or None when all have the batch's length)."""
    ctx = model.dims.n_audio_ctx
    frames = context.window_frames(ctx)
    sizes = [min(frames, s.clip_end - s.seek) for s in streams]
    features, lengths = encode_windows(model, [s.mel[s.seek:s.seek + n] for s, n in zip(streams, sizes)],
                                       [context.positions_for(n, ctx) for n in sizes], sizes)
    return sizes, features, lengths


def _window(model, tokenizer, streams, options, temperatures, cr_threshold, lp_threshold,
            ns_threshold, condition, word_timestamps, prepend, append, silence_threshold,
            verbose, named, context) -> None:
    sizes, features, lengths = _encode_windows(model, streams, context)
    undetected = [i for i, s in enumerate(streams) if s.language is None]
    if undetected and model.is_multilingual:
        langs, _ = detect_language(model, features[mx.array(undetected)], tokenizer,
                                   None if lengths is None else [lengths[i] for i in undetected])
        for i, lang in zip(undetected, langs):
            streams[i].language = lang
            if verbose is not None:  # tqdm.write: the progress bar may be on screen
                tqdm.write(f"{streams[i].name + ': ' if named else ''}"
                           f"Detected language: {LANGUAGES[lang].title()}")
    for s in streams:
        s.language = s.language or "en"
    prompts = [s.tokens[s.prompt_since:] for s in streams]
    results = decode_with_fallback(model, features, [s.language for s in streams], prompts, options,
                                   temperatures, cr_threshold, lp_threshold, ns_threshold, lengths)
    # resume_early_end: a prompted window that ends at its start although speech follows is
    # decoded again without the prompt (the text before it made the model stop at once).
    again = [i for i, (s, size, r) in enumerate(zip(streams, sizes, results))
             if prompts[i] and s.speech is not None and _speech_after(s, 0, size)
             and not any(t < tokenizer.eot for t in r.tokens)]
    if again:
        retried = decode_with_fallback(model, features[mx.array(again)], [streams[i].language for i in again],
                                       [[] for _ in again], options, temperatures, cr_threshold,
                                       lp_threshold, ns_threshold,
                                       None if lengths is None else [lengths[i] for i in again])
        for i, r in zip(again, retried):
            results[i] = r
    for i, (s, size, result) in enumerate(zip(streams, sizes, results)):
        start = s.seek
        if ns_threshold is not None and result.no_speech_prob > ns_threshold and not (
                lp_threshold is not None and result.avg_logprob > lp_threshold):
            s.seek += size  # silence: skip the window without emitting text
            s.next_clip()
            continue
        new = _segments(s, size, result, tokenizer)
        if word_timestamps and new:
            from .timing import add_word_timestamps
            own = features[i:i + 1] if lengths is None else features[i:i + 1, :lengths[i]]
            add_word_timestamps(new, model, replace(tokenizer, language=s.language),
                                own, size, prepend, append, s.last_speech)
            if silence_threshold is not None:
                new = _skip_hallucinations(s, new, start, size, silence_threshold, prepend + append)
            words = [w for seg in new for w in seg.get("words", [])]
            if words:
                s.last_speech = words[-1]["end"]
        for seg in new:
            if seg["start"] == seg["end"] or not seg["text"].strip():
                seg["text"], seg["tokens"], seg["words"] = "", [], []
            seg["id"] = len(s.segments)
            s.segments.append(seg)
            if verbose:
                print(f"{s.name + ': ' if named else ''}[{format_timestamp(seg['start'])} --> "
                      f"{format_timestamp(seg['end'])}] {seg['text']}")
        for seg in new:
            s.tokens.extend(seg["tokens"])
        if not condition or result.temperature > 0.5:
            s.prompt_since = len(s.tokens)
        s.next_clip()


def _frames(seconds: float) -> int:
    return round(seconds * FRAMES_PER_SECOND)


def _oddness(word: dict[str, Any]) -> float:
    """How unlike real speech a word is: improbable, or clipped (< 0.133 s) or stretched (> 2 s)."""
    duration = word["end"] - word["start"]
    return float(word["probability"] < 0.15) + max(0.0, 0.133 - duration) * 15 + max(0.0, duration - 2.0)


def _looks_hallucinated(seg: Optional[dict[str, Any]], punctuation: str) -> bool:
    """Judged on the first eight words: hallucinations are mostly odd from the start."""
    if seg is None:
        return False
    words = [w for w in seg["words"] if w["word"].strip() not in punctuation][:8]
    score = sum(_oddness(w) for w in words)
    return score >= ODD_SEGMENT_SCORE or score + 0.01 >= len(words)


def _skip_hallucinations(s: _Stream, new: list[dict[str, Any]], start: int, size: int,
                         threshold: float, punctuation: str) -> list[dict[str, Any]]:
    """Drop a likely hallucination with more than ``threshold`` seconds of silence before it
    (and silence, or more doubtful words, after), and everything after it in the window;
    the next window starts past the silence. Returns the segments kept; moves ``s.seek``.
    """
    t_start, t_end = start / FRAMES_PER_SECOND, (start + size) / FRAMES_PER_SECOND
    spoken = [k for k, seg in enumerate(new) if seg["words"]]
    if not spoken:
        return new
    first = new[spoken[0]]
    if _looks_hallucinated(first, punctuation) and first["start"] - t_start > threshold:
        s.seek = max(start + 1, _frames(first["start"]))  # decode again after the silence
        return []
    previous_end = s.last_speech
    for n, k in enumerate(spoken):
        seg = new[k]
        following = new[spoken[n + 1]] if n + 1 < len(spoken) else None
        if _looks_hallucinated(seg, punctuation):
            next_start = following["words"][0]["start"] if following else t_end
            quiet_before = seg["start"] - previous_end > threshold
            quiet_after = (next_start - seg["end"] > threshold or t_end - seg["end"] < EDGE_SECONDS
                           or _looks_hallucinated(following, punctuation))
            if quiet_before and quiet_after:
                s.seek = max(start + FRAMES_PER_SECOND, _frames(seg["start"]))
                if s.content_frames / FRAMES_PER_SECOND - seg["end"] < threshold:
                    s.seek = s.content_frames  # only silence and doubtful words remain
                return new[:k]
        previous_end = seg["end"]
    return new


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
            s.seek += _early_end(s, size, tokens[-1] - tb)
        else:
            s.seek += (tokens[last - 1] - tb) * INPUT_STRIDE
    else:
        duration = size * HOP_LENGTH / SAMPLE_RATE
        stamps = [t for t in tokens if t >= tb]
        if stamps and stamps[-1] != tb:
            duration = (stamps[-1] - tb) * TIME_PRECISION
        add(offset, offset + duration, tokens)
        s.seek += _early_end(s, size, stamps[-1] - tb) if stamps else size
    return segs


def _early_end(s: _Stream, size: int, last_step: int) -> int:
    """How far to advance after a window whose text ends at timestamp step ``last_step``:
    the whole window (openai-whisper), or, with ``resume_early_end``, only to that step
    when enough speech follows it in the window (see EARLY_END_SECONDS)."""
    end = last_step * INPUT_STRIDE
    if s.speech is None or end <= 0 or size - end < EARLY_END_SECONDS * FRAMES_PER_SECOND:
        return size
    return end if _speech_after(s, end, size) else size


def _speech_after(s: _Stream, start: int, end: int) -> bool:
    """Whether the VAD hears EARLY_END_SPEECH_SECONDS of speech between frames ``start`` and
    ``end`` of the current window."""
    a, b = (s.seek + start) // INPUT_STRIDE, (s.seek + end) // INPUT_STRIDE
    return int(np.count_nonzero(s.speech[a:b])) * TIME_PRECISION >= EARLY_END_SPEECH_SECONDS
