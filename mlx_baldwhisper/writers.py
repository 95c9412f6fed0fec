"""Transcript writers producing the same files as openai-whisper's ``--output_format``.

Formats: txt (one segment per line), vtt, srt, tsv (integer milliseconds), json, and "all".
Subtitles follow the word timings when segments carry ``"words"``, honouring the options
``highlight_words``, ``max_line_width``, ``max_line_count`` and ``max_words_per_line``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TextIO

WordList = list[dict]
Cue = tuple[str, str, str]  # (start, end, text) with formatted timestamps

# A pause longer than this starts a new subtitle when line limits are in force (whisper's rule).
LONG_PAUSE_SECONDS = 3.0
UNLIMITED = 1000  # what whisper uses for "no limit" on line width and words per line


def format_timestamp(seconds: float, always_include_hours: bool = False,
                     decimal_marker: str = ".") -> str:
    """``[HH:]MM:SS.mmm``, rounded to the millisecond; hours appear when needed or asked for."""
    if seconds < 0:
        raise ValueError(f"non-negative timestamp expected, got {seconds}")
    hours, rest = divmod(round(seconds * 1000.0), 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    prefix = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{prefix}{minutes:02d}:{secs:02d}{decimal_marker}{millis:03d}"


def _segments_text(result: dict) -> Iterator[str]:
    for segment in result["segments"]:
        yield segment["text"].strip()


def write_txt(result: dict, file: TextIO, options: Optional[dict] = None) -> None:
    for text in _segments_text(result):
        file.write(text + "\n")


def write_tsv(result: dict, file: TextIO, options: Optional[dict] = None) -> None:
    """Integer milliseconds avoid locale-dependent decimal separators."""
    file.write("start\tend\ttext\n")
    for segment in result["segments"]:
        text = segment["text"].strip().replace("\t", " ")
        file.write(f"{round(1000 * segment['start'])}\t{round(1000 * segment['end'])}\t{text}\n")


def write_json(result: dict, file: TextIO, options: Optional[dict] = None) -> None:
    json.dump(result, file, ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    # NumPy / MLX scalars and arrays sneak into results; write them as plain numbers
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _group_words(segments: list[dict], max_line_width: Optional[int],
                 max_line_count: Optional[int], max_words_per_line: Optional[int]) -> Iterator[WordList]:
    """Split the word timings into subtitles; words starting a new line get a leading newline.

    Without both a width and a line count, each segment (or each ``max_words_per_line`` chunk
    of it) stays its own subtitle; with both, subtitles flow across segments and break on a
    full subtitle or a long pause.
    """
    keep_segments = max_line_count is None or max_line_width is None
    width = max_line_width or UNLIMITED
    per_chunk = max_words_per_line or UNLIMITED
    first = next((w["start"] for s in segments for w in s.get("words", [])), None)
    last_start = first if first is not None else (segments[0]["start"] if segments else 0.0)

    subtitle: WordList = []
    line_len, line_count = 0, 1
    for segment in segments:
        words = segment.get("words", [])
        for chunk_start in range(0, len(words), per_chunk):
            for i, original in enumerate(words[chunk_start:chunk_start + per_chunk]):
                word = dict(original)
                long_pause = not keep_segments and word["start"] - last_start > LONG_PAUSE_SECONDS
                fits = line_len + len(word["word"]) <= width
                chunk_break = keep_segments and i == 0 and len(subtitle) > 0
                if line_len > 0 and fits and not long_pause and not chunk_break:
                    line_len += len(word["word"])
                else:
                    word["word"] = word["word"].strip()
                    full = max_line_count is not None and (long_pause or line_count >= max_line_count)
                    if chunk_break or (subtitle and full):
                        yield subtitle
                        subtitle, line_count = [], 1
                    elif line_len > 0:
                        line_count += 1
                        word["word"] = "\n" + word["word"]
                    line_len = len(word["word"].strip())
                subtitle.append(word)
                last_start = word["start"]
    if subtitle:
        yield subtitle


def _underline(word: str) -> str:
    body = word.lstrip()
    return f"{word[:len(word) - len(body)]}<u>{body}</u>"


def iterate_cues(result: dict, options: Optional[dict], fmt: Callable[[float], str]) -> Iterator[Cue]:
    """Subtitle cues: per segment, or from word timings when the segments have ``"words"``."""
    options = options or {}
    segments = result["segments"]
    if not segments or "words" not in segments[0]:
        for segment in segments:
            text = segment["text"].strip().replace("-->", "->")
            yield fmt(segment["start"]), fmt(segment["end"]), text
        return

    groups = _group_words(segments, options.get("max_line_width"), options.get("max_line_count"),
                          options.get("max_words_per_line"))
    for words in groups:
        start, end = fmt(words[0]["start"]), fmt(words[-1]["end"])
        text = "".join(w["word"] for w in words)
        if not options.get("highlight_words"):
            yield start, end, text
            continue
        # one cue per word with that word underlined; gaps between words show the plain text
        shown_until = start
        for i, word in enumerate(words):
            word_start, word_end = fmt(word["start"]), fmt(word["end"])
            if word_start != shown_until:
                yield shown_until, word_start, text
            marked = "".join(_underline(w["word"]) if j == i else w["word"] for j, w in enumerate(words))
            yield word_start, word_end, marked
            shown_until = word_end


def write_vtt(result: dict, file: TextIO, options: Optional[dict] = None) -> None:
    file.write("WEBVTT\n\n")
    for start, end, text in iterate_cues(result, options, format_timestamp):
        file.write(f"{start} --> {end}\n{text}\n\n")


def _srt_time(seconds: float) -> str:
    return format_timestamp(seconds, always_include_hours=True, decimal_marker=",")


def write_srt(result: dict, file: TextIO, options: Optional[dict] = None) -> None:
    for index, (start, end, text) in enumerate(iterate_cues(result, options, _srt_time), start=1):
        file.write(f"{index}\n{start} --> {end}\n{text}\n\n")


WRITERS: dict[str, Callable[[dict, TextIO, Optional[dict]], None]] = {
    "txt": write_txt, "vtt": write_vtt, "srt": write_srt, "tsv": write_tsv, "json": write_json,
}


def get_writer(output_format: str, output_dir: str | os.PathLike) -> Callable[..., Any]:
    """Return ``write(result, audio_path, options=None)`` that writes ``<dir>/<audio stem>.<ext>``.

    The writer returns the path written (a list of paths for ``"all"``).
    """
    if output_format == "all":
        formats = list(WRITERS)
    elif output_format in WRITERS:
        formats = [output_format]
    else:
        raise ValueError(f"unknown output format {output_format!r}; "
                         f"choose from {', '.join([*WRITERS, 'all'])}")

    def write(result: dict, audio_path: str | os.PathLike, options: Optional[dict] = None):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        stem = os.path.splitext(os.path.basename(os.fspath(audio_path)))[0]
        paths = []
        for fmt in formats:
            path = Path(output_dir) / f"{stem}.{fmt}"
            with open(path, "w", encoding="utf-8") as file:
                WRITERS[fmt](result, file, options)
            paths.append(path)
        return paths if output_format == "all" else paths[0]

    return write
