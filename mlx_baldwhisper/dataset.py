"""Speech datasets: manifests, utterances, and tokenised 30-second examples.

The pipeline is ``read_manifest`` -> ``prepare``. ``prepare`` skips (and reports) clips
that cannot be used instead of crashing a long run on one bad file. Evaluation and
training both read their data through here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from .audio import N_SAMPLES, SAMPLE_RATE, AudioError, load_audio, log_mel_spectrogram, pad_or_trim, resample
from .tokenizer import Tokenizer, UnknownLanguageError, language_code
from .vad import speech_regions

log = logging.getLogger(__name__)

AUDIO_KEYS = ("path", "audio", "file", "audio_filepath", "file_name", "filename")
TEXT_KEYS = ("sentence", "text", "transcript", "transcription")
LANGUAGE_KEYS = ("language", "locale", "lang")
DURATION_KEYS = ("duration", "duration_s", "seconds")
TIME_PRECISION = 0.02  # seconds per timestamp token
MANIFEST_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")

AudioSource = Union[str, tuple[np.ndarray, int]]
Report = Callable[[str, str], None]


class ManifestError(ValueError):
    """A manifest that exists but cannot be read (bad columns, malformed rows)."""


class ClipTooLongError(ValueError):
    """The clip does not fit one 30-second Whisper window."""


@dataclass
class Example:
    """One utterance. ``audio`` is an absolute path, or ``(samples, sample_rate)`` for
    in-memory audio (Hugging Face datasets); ``key`` then names it in reports and caches."""

    audio: AudioSource
    text: str
    language: Optional[str] = None
    duration: Optional[float] = None
    key: Optional[str] = None

    @property
    def name(self) -> str:
        if self.key is not None:
            return self.key
        if isinstance(self.audio, str):
            return self.audio
        samples, sr = self.audio
        digest = hashlib.sha1(np.ascontiguousarray(samples).tobytes() + str(sr).encode()).hexdigest()
        return f"<array {digest[:16]}>"


@dataclass
class TokenizedExample:
    """A training item: padded log-Mel window and ``tokens`` = prompt + text + eot.

    The decoder reads ``inputs`` (tokens[:-1]) and predicts ``targets`` (tokens[1:]);
    ``mask`` is 1 only where the target is a text token or eot, never the prompt.
    ``timestamp_tokens`` is the same clip as one timestamped segment (see
    :func:`timestamped`), or None when it would not fit; :meth:`with_timestamps` trains on it.
    """

    audio: str
    text: str
    language: Optional[str]
    mel: np.ndarray  # (N_FRAMES, n_mels)
    tokens: np.ndarray  # int32
    prompt_length: int
    duration: float
    timestamp_tokens: Optional[np.ndarray] = None

    @property
    def name(self) -> str:
        return self.audio

    def with_timestamps(self) -> "TokenizedExample":
        """This clip with its timestamped targets (its prompt loses <|notimestamps|>)."""
        if self.timestamp_tokens is None:
            return self
        return replace(self, tokens=self.timestamp_tokens, prompt_length=self.prompt_length - 1,
                       timestamp_tokens=None)

    def with_prompt(self, prefix: Sequence[int]) -> "TokenizedExample":
        """This clip conditioned on ``prefix`` (``<|startofprev|>`` and earlier text), as
        ``transcribe()`` conditions each window on the text before it; the prefix is input
        only, never a target."""
        if not len(prefix):
            return self
        head = np.asarray(prefix, np.int32)
        stamped = None if self.timestamp_tokens is None else np.concatenate([head, self.timestamp_tokens])
        return replace(self, tokens=np.concatenate([head, self.tokens]),
                       prompt_length=self.prompt_length + len(head), timestamp_tokens=stamped)

    @property
    def text_tokens(self) -> np.ndarray:
        """What the model writes after the prompt, without eot (a packed window's
        timestamps included, as in the text ``transcribe()`` conditions on)."""
        return self.tokens[self.prompt_length:-1]

    @property
    def segment_tokens(self) -> np.ndarray:
        """This clip as ``transcribe()`` keeps a window's text to prompt the next one: its
        timestamped segment when it has one, else its text."""
        if self.timestamp_tokens is None:
            return self.text_tokens
        return self.timestamp_tokens[self.prompt_length - 1:-1]

    @property
    def inputs(self) -> np.ndarray:
        return self.tokens[:-1]

    @property
    def targets(self) -> np.ndarray:
        return self.tokens[1:]

    @property
    def mask(self) -> np.ndarray:
        m = np.zeros(len(self.tokens) - 1, np.float32)
        m[self.prompt_length - 1:] = 1.0
        return m


# ---- manifests ------------------------------------------------------------------------

def read_manifest(path: Union[str, os.PathLike], language: Optional[str] = None,
                  split: str = "train") -> list[Example]:
    """Read a TSV/CSV/JSONL manifest, or a Common Voice folder's ``{split}.tsv``.

    ``language`` is the default for rows without a ``language``/``locale`` column.
    """
    p = Path(path)
    if p.is_dir():
        return read_split(p, split, language)
    if not p.exists():
        raise FileNotFoundError(f"manifest not found: {p}")
    rows = _read_rows(p)
    if not rows:
        return []
    cols = list(dict.fromkeys(k for _, row in rows for k in row))  # JSONL rows may differ
    _check_column(cols, AUDIO_KEYS, "audio path", p)
    _check_column(cols, TEXT_KEYS, "transcript", p)
    base = p.parent.absolute()
    out = []
    for line, row in rows:
        audio = str(_first(row, AUDIO_KEYS) or "").strip()
        if not audio:
            raise ManifestError(f"{p}:{line}: no audio path (one of {list(AUDIO_KEYS)})")
        lang = _norm_language(_first(row, LANGUAGE_KEYS))
        out.append(Example(_resolve(base, audio), str(_first(row, TEXT_KEYS) or ""),
                           lang or language, _duration(_first(row, DURATION_KEYS), p, line)))
    return out


def read_split(folder: Union[str, os.PathLike], split: str, language: Optional[str] = None) -> list[Example]:
    """``folder/{split}.tsv`` (or .csv/.jsonl/.json): the Common Voice folder layout."""
    folder = Path(folder)
    for suffix in MANIFEST_SUFFIXES:
        if (folder / f"{split}{suffix}").is_file():
            return read_manifest(folder / f"{split}{suffix}", language)
    found = sorted(f.name for f in folder.glob("*") if f.suffix in MANIFEST_SUFFIXES)
    raise FileNotFoundError(f"no manifest for split {split!r} in {folder} (found: {found or 'none'})")


def _read_rows(p: Path) -> list[tuple[int, dict[str, Any]]]:
    text = p.read_text(encoding="utf-8-sig")
    head = text.lstrip()[:1]
    if p.suffix in (".jsonl", ".json") or (p.suffix not in (".tsv", ".csv") and head in "{["):
        if head == "[":
            data = json.loads(text)
            return [(i + 1, _lower_keys(r)) for i, r in enumerate(data)]
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((i, _lower_keys(json.loads(line))))
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{p}:{i}: not a JSON object: {e}") from None
        return rows
    first = text.split("\n", 1)[0]
    tsv = p.suffix == ".tsv" or (p.suffix != ".csv" and "\t" in first)
    # Common Voice sentences contain bare quotes: tab-separated files are read unquoted.
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if tsv else ",",
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    return [(i + 2, _lower_keys(r)) for i, r in enumerate(reader)]


def _lower_keys(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ManifestError(f"manifest rows must be objects, got {type(row).__name__}")
    return {str(k).strip().lower(): v for k, v in row.items() if k is not None}


def _check_column(cols: list[str], keys: Sequence[str], what: str, p: Path) -> None:
    if not any(k in cols for k in keys):
        raise ManifestError(f"{p}: no {what} column; expected one of {list(keys)}, found {cols}")


def _first(row: dict[str, Any], keys: Sequence[str]) -> Any:
    """The first of ``keys`` present in the row with a non-empty value."""
    for k in keys:
        v = row.get(k)
        if v is not None and str(v).strip() != "":
            return v
    return None


def _resolve(base: Path, audio: str) -> str:
    p = Path(audio).expanduser()
    if p.is_absolute():
        return str(p)
    direct = base / p
    if not direct.exists() and (base / "clips").is_dir():
        return str(base / "clips" / p)  # Common Voice: tsv paths are relative to clips/
    return str(direct)


def _norm_language(value: Any) -> Optional[str]:
    """'ha' stays, 'sv-SE' -> 'sv' (Common Voice locales), names like 'Hausa' -> 'hausa'."""
    if value is None or not str(value).strip():
        return None
    return str(value).strip().lower().replace("_", "-").split("-")[0]


def _duration(value: Any, p: Path, line: int) -> Optional[float]:
    if value is None or str(value).strip() == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise ManifestError(f"{p}:{line}: duration {value!r} is not a number") from None


def read_hf_dataset(name_or_path: str, split: str = "train", audio_column: str = "audio",
                    text_column: str = "sentence", language: Optional[str] = None) -> list[Example]:
    """Examples from a Hugging Face dataset (a ``save_to_disk`` folder or a hub name).

    Audio values may be dicts with ``array``/``sampling_rate`` (then ``Example.audio`` is
    ``(samples, sr)``), with a ``path`` on disk (a path string), or with encoded ``bytes``
    (decoded here). Needs the optional ``datasets`` package.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError("read_hf_dataset needs the optional package 'datasets': "
                          "pip install datasets") from None
    if os.path.isdir(name_or_path):
        ds = datasets.load_from_disk(name_or_path)
        if not hasattr(ds, "column_names") or isinstance(ds.column_names, dict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name_or_path, split=split)
    cols = list(ds.column_names)
    for c in (audio_column, text_column):
        if c not in cols:
            raise ManifestError(f"{name_or_path}: no column {c!r}; found {cols}")
    try:  # avoid datasets' own decoder (torchcodec in datasets>=4): read paths/bytes ourselves
        ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
    except Exception:
        pass
    lang_col = next((c for c in LANGUAGE_KEYS if c in cols), None)
    out = []
    for i, row in enumerate(ds):
        audio, key = hf_audio(row[audio_column], f"{name_or_path}:{split}:{i}")
        lang = _norm_language(row.get(lang_col)) if lang_col else None
        out.append(Example(audio, str(row[text_column] or ""), lang or language, key=key))
    return out


def hf_audio(value: Any, fallback_key: str) -> tuple[AudioSource, str]:
    """Turn one Hugging Face audio value into an ``Example.audio`` and a stable key."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value), os.fspath(value)
    if isinstance(value, dict):
        path = value.get("path")
        key = str(path) if path else fallback_key
        if value.get("array") is not None:
            return (np.asarray(value["array"], np.float32), int(value["sampling_rate"])), key
        if path and os.path.isfile(path):
            return os.path.abspath(path), key
        if value.get("bytes"):
            import soundfile as sf

            data, sr = sf.read(io.BytesIO(value["bytes"]), dtype="float32", always_2d=True)
            return (data.mean(axis=1), int(sr)), key
    if hasattr(value, "get_all_samples"):  # torchcodec AudioDecoder
        s = value.get_all_samples()
        return (np.asarray(s.data, np.float32).mean(axis=0), int(s.sample_rate)), fallback_key
    raise ManifestError(f"{fallback_key}: unsupported audio value of type {type(value).__name__}")


# ---- features and tokens --------------------------------------------------------------

def load_samples(audio: AudioSource) -> np.ndarray:
    """Mono 16 kHz float32 samples, decoded and resampled exactly as transcribe() does."""
    if isinstance(audio, tuple):
        samples, sr = audio
        return resample(load_audio(np.asarray(samples)), int(sr), SAMPLE_RATE)
    return load_audio(audio)


def load_mel(audio: AudioSource, n_mels: int, dtype: Any = np.float32) -> np.ndarray:
    """Log-Mel ``(N_FRAMES, n_mels)`` of the clip zero-padded to 30 s, as Whisper was trained.

    Raises AudioError (undecodable) or ClipTooLongError (over 30 s).
    """
    samples = load_samples(audio)
    if samples.shape[0] > N_SAMPLES:
        raise ClipTooLongError(f"longer than 30 s ({samples.shape[0] / SAMPLE_RATE:.1f} s)")
    return np.asarray(log_mel_spectrogram(pad_or_trim(samples, N_SAMPLES), n_mels), dtype=dtype)


def prompt_tokens(tokenizer: Tokenizer, language: Optional[str]) -> tuple[int, ...]:
    """``sot_sequence(language, transcribe) + <|notimestamps|>``; clear error for unknown languages."""
    if not tokenizer.multilingual:
        return tuple(tokenizer.sot_sequence) + (tokenizer.no_timestamps,)
    lang = (language or tokenizer.language or "en").strip().lower()
    try:
        code = lang if lang in tokenizer.language_aliases else language_code(lang)
        seq = replace(tokenizer, language=code, task="transcribe").sot_sequence
    except UnknownLanguageError as e:
        raise UnknownLanguageError(
            f"{e}. Map it to a language the model has, e.g. "
            f"tokenizer.language_aliases[{lang!r}] = 'ha'") from None
    return tuple(seq) + (tokenizer.no_timestamps,)


def segment_end(samples: np.ndarray) -> float:
    """Where a clip's one segment ends: the end of its speech (the energy VAD's last region,
    padding included; the whole clip if it finds none), rounded to a timestamp step and
    kept within (0, 30] s. A clip's trailing silence is not speech, and Whisper's own
    segments end where the speech does, which is also where long-form seeking resumes."""
    regions = speech_regions(samples)
    end = regions[-1][1] / SAMPLE_RATE if regions else samples.shape[0] / SAMPLE_RATE
    steps = int(round(end / TIME_PRECISION))
    return min(max(steps, 1), round(N_SAMPLES / SAMPLE_RATE / TIME_PRECISION)) * TIME_PRECISION


def timestamped(tokenizer: Tokenizer, prompt: Sequence[int], text_ids: Sequence[int],
                end: float) -> list[int]:
    """A clip as one segment, as Whisper is trained with timestamps: the prompt without
    <|notimestamps|>, then ``<|0.00|> text <|end|>`` and eot."""
    if not prompt or prompt[-1] != tokenizer.no_timestamps:
        raise ValueError("the prompt must end with <|notimestamps|>")
    return timestamp_target(prompt[:-1], tokenizer.timestamp_begin, tokenizer.eot,
                            [(0, text_ids, int(round(end / TIME_PRECISION)))])


def timestamp_target(prompt: Sequence[int], timestamp_begin: int, eot: int,
                     segments: Sequence[tuple[int, Sequence[int], int]],
                     cut_start: Optional[int] = None) -> list[int]:
    """A window's timestamped targets: ``prompt`` (without <|notimestamps|>), then
    ``<|start|> text <|end|>`` for each ``(start, text_ids, end)`` (times in 0.02-s steps,
    in order, within 30 s), then eot.

    ``cut_start``: the window ends inside one more segment that starts there. As in
    openai's long-form training data, its text is left out and only its start is given:
    a window ending in two timestamps tells the seeking loop (transcribe.py) that speech
    was cut off, so the next window starts at the last complete segment's end. A single
    timestamp at the end means nothing follows, and the rest of the window is skipped."""
    limit = round(N_SAMPLES / SAMPLE_RATE / TIME_PRECISION)
    out, last = list(prompt), 0
    for start, text_ids, end in segments:
        if not last <= start < end <= limit:
            raise ValueError(f"segment ({start}, {end}) is out of order or past 30 s")
        out += [timestamp_begin + start, *text_ids, timestamp_begin + end]
        last = end
    if cut_start is not None:
        if not last <= cut_start < limit:
            raise ValueError(f"a cut-off segment cannot start at step {cut_start}")
        out.append(timestamp_begin + cut_start)
    return out + [eot]


def prepare(examples: Iterable[Example], tokenizer: Tokenizer, n_mels: int, max_tokens: int = 224,
            report: Optional[Report] = None, dtype: Any = np.float16, progress: bool = False
            ) -> tuple[list[TokenizedExample], list[tuple[str, str]]]:
    """Load, featurise and tokenise examples; returns ``(items, skipped)``.

    Clips that fail to decode, last over 30 s, or whose text tokens + eot exceed
    ``max_tokens`` (Whisper's sample_len, n_text_ctx // 2) are skipped: each is logged,
    passed to ``report(name, reason)`` and listed in ``skipped``. Each item also carries
    its timestamped targets (``segment_end``, ``timestamped``) when the two timestamps fit
    within ``max_tokens`` too.
    """
    from tqdm import tqdm

    items: list[TokenizedExample] = []
    skipped: list[tuple[str, str]] = []
    prompts: dict[Optional[str], tuple[int, ...]] = {}

    def skip(name: str, reason: str) -> None:
        log.warning("skipping %s: %s", name, reason)
        skipped.append((name, reason))
        if report is not None:
            report(name, reason)

    for ex in tqdm(list(examples), desc="preparing", disable=not progress):
        if ex.language not in prompts:
            prompts[ex.language] = prompt_tokens(tokenizer, ex.language)
        prompt = prompts[ex.language]
        text_ids = tokenizer.encode(" " + ex.text.strip()) if ex.text.strip() else []
        if len(text_ids) + 1 > max_tokens:
            skip(ex.name, f"transcript too long ({len(text_ids) + 1} tokens > {max_tokens})")
            continue
        if ex.duration is not None and ex.duration > N_SAMPLES / SAMPLE_RATE:
            skip(ex.name, f"longer than 30 s ({ex.duration:.1f} s)")
            continue
        try:
            samples = load_samples(ex.audio)
        except AudioError as e:
            skip(ex.name, f"cannot decode: {e}")
            continue
        if samples.shape[0] > N_SAMPLES:
            skip(ex.name, f"longer than 30 s ({samples.shape[0] / SAMPLE_RATE:.1f} s)")
            continue
        mel = np.asarray(log_mel_spectrogram(pad_or_trim(samples, N_SAMPLES), n_mels), dtype=dtype)
        tokens = np.array(list(prompt) + text_ids + [tokenizer.eot], dtype=np.int32)
        stamped = None
        if len(text_ids) + 3 <= max_tokens:
            stamped = np.array(timestamped(tokenizer, prompt, text_ids, segment_end(samples)), np.int32)
        lang = tokenizer.language if ex.language is None else ex.language
        items.append(TokenizedExample(ex.name, ex.text, lang, mel, tokens, len(prompt),
                                      samples.shape[0] / SAMPLE_RATE, stamped))
    return items, skipped
