"""Writers must produce byte-for-byte what openai-whisper's writers produce."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from mlx_baldwhisper.writers import (
    format_timestamp, get_writer, write_json, write_srt, write_tsv, write_txt, write_vtt,
)


def segment(i: int, start: float, end: float, text: str, words=None) -> dict:
    seg = {"id": i, "seek": 0, "start": start, "end": end, "text": text, "tokens": [50364, 2425],
           "temperature": 0.0, "avg_logprob": -0.25, "compression_ratio": 1.1,
           "no_speech_prob": 0.02}
    if words is not None:
        seg["words"] = [{"word": w, "start": s, "end": e, "probability": 0.9} for w, s, e in words]
    return seg


# Segment-level result: an hour-long timestamp, "-->" and a tab inside the text.
PLAIN = {
    "text": " Hello world. A --> B\tC ",
    "segments": [segment(0, 0.0, 2.5, " Hello world."),
                 segment(1, 2.5, 3661.5, " A --> B\tC ")],
    "language": "en",
}

# Word-level result: two segments separated by a pause longer than 3 s.
WORDS = {
    "text": " Hello big world. Bye now.",
    "segments": [
        segment(0, 0.0, 1.5, " Hello big world.",
                [(" Hello", 0.0, 0.5), (" big", 0.6, 0.9), (" world.", 1.0, 1.5)]),
        segment(1, 5.0, 6.0, " Bye now.", [(" Bye", 5.0, 5.4), (" now.", 5.5, 6.0)]),
    ],
    "language": "en",
}


def render(writer, result: dict, **options) -> str:
    buffer = io.StringIO()
    writer(result, buffer, options)
    return buffer.getvalue()


def test_format_timestamp():
    assert format_timestamp(0) == "00:00.000"
    assert format_timestamp(1.0004) == "00:01.000"
    assert format_timestamp(59.9996) == "01:00.000"
    assert format_timestamp(3661.5) == "01:01:01.500"
    assert format_timestamp(36000) == "10:00:00.000"
    assert format_timestamp(1.25, always_include_hours=True) == "00:00:01.250"
    assert format_timestamp(1.25, True, decimal_marker=",") == "00:00:01,250"
    with pytest.raises(ValueError):
        format_timestamp(-0.5)


def test_txt():
    assert render(write_txt, PLAIN) == "Hello world.\nA --> B\tC\n"


def test_vtt():
    assert render(write_vtt, PLAIN) == (
        "WEBVTT\n\n"
        "00:00.000 --> 00:02.500\nHello world.\n\n"
        "00:02.500 --> 01:01:01.500\nA -> B\tC\n\n"
    )


def test_srt():
    assert render(write_srt, PLAIN) == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello world.\n\n"
        "2\n00:00:02,500 --> 01:01:01,500\nA -> B\tC\n\n"
    )


def test_tsv():
    assert render(write_tsv, PLAIN) == "start\tend\ttext\n0\t2500\tHello world.\n2500\t3661500\tA --> B C\n"


def test_json_roundtrip_and_unicode():
    result = {**PLAIN, "text": " naïve 日本", "extra": np.float32(0.5), "ids": np.arange(2)}
    text = render(write_json, result)
    assert "naïve 日本" in text
    loaded = json.loads(text)
    assert loaded["segments"] == PLAIN["segments"]
    assert loaded["extra"] == 0.5 and loaded["ids"] == [0, 1]


def test_word_level_subtitles_follow_segments():
    assert render(write_vtt, WORDS) == (
        "WEBVTT\n\n"
        "00:00.000 --> 00:01.500\nHello big world.\n\n"
        "00:05.000 --> 00:06.000\nBye now.\n\n"
    )


def test_highlight_words():
    assert render(write_srt, WORDS, highlight_words=True) == (
        "1\n00:00:00,000 --> 00:00:00,500\n<u>Hello</u> big world.\n\n"
        "2\n00:00:00,500 --> 00:00:00,600\nHello big world.\n\n"
        "3\n00:00:00,600 --> 00:00:00,900\nHello <u>big</u> world.\n\n"
        "4\n00:00:00,900 --> 00:00:01,000\nHello big world.\n\n"
        "5\n00:00:01,000 --> 00:00:01,500\nHello big <u>world.</u>\n\n"
        "6\n00:00:05,000 --> 00:00:05,400\n<u>Bye</u> now.\n\n"
        "7\n00:00:05,400 --> 00:00:05,500\nBye now.\n\n"
        "8\n00:00:05,500 --> 00:00:06,000\nBye <u>now.</u>\n\n"
    )


def test_max_line_width_wraps_lines():
    expected = (
        "WEBVTT\n\n"
        "00:00.000 --> 00:01.500\nHello big\nworld.\n\n"
        "00:05.000 --> 00:06.000\nBye now.\n\n"
    )
    assert render(write_vtt, WORDS, max_line_width=10) == expected
    assert render(write_vtt, WORDS, max_line_width=10, max_line_count=2) == expected


def test_max_line_count_splits_subtitles():
    assert render(write_vtt, WORDS, max_line_width=10, max_line_count=1) == (
        "WEBVTT\n\n"
        "00:00.000 --> 00:00.900\nHello big\n\n"
        "00:01.000 --> 00:01.500\nworld.\n\n"
        "00:05.000 --> 00:06.000\nBye now.\n\n"
    )


def test_limits_let_subtitles_span_segments():
    # with both limits set, segments flow together unless a > 3 s pause separates them
    close = {**WORDS, "segments": [WORDS["segments"][0], segment(
        1, 2.0, 3.0, " Bye now.", [(" Bye", 2.0, 2.4), (" now.", 2.5, 3.0)])]}
    assert render(write_vtt, close, max_line_width=20, max_line_count=2) == (
        "WEBVTT\n\n00:00.000 --> 00:03.000\nHello big world. Bye\nnow.\n\n"
    )


def test_max_words_per_line():
    assert render(write_vtt, WORDS, max_words_per_line=2) == (
        "WEBVTT\n\n"
        "00:00.000 --> 00:00.900\nHello big\n\n"
        "00:01.000 --> 00:01.500\nworld.\n\n"
        "00:05.000 --> 00:06.000\nBye now.\n\n"
    )


def test_get_writer_paths(tmp_path):
    out = tmp_path / "out"
    path = get_writer("srt", out)(PLAIN, "/some/where/my.clip.flac")
    assert path == out / "my.clip.srt"
    assert path.read_text(encoding="utf-8") == render(write_srt, PLAIN)

    paths = get_writer("all", out)(WORDS, "talk.mp3", {"highlight_words": True})
    assert sorted(p.name for p in paths) == ["talk.json", "talk.srt", "talk.tsv", "talk.txt", "talk.vtt"]
    assert (out / "talk.vtt").read_text(encoding="utf-8") == render(write_vtt, WORDS, highlight_words=True)
    assert json.loads((out / "talk.json").read_text(encoding="utf-8")) == WORDS

    with pytest.raises(ValueError, match="unknown output format"):
        get_writer("docx", out)
