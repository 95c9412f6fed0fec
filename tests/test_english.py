"""Integration: the embedded whisper-base on real English clips, against faster-whisper's output."""

import json

import numpy as np
import pytest
import soundfile as sf

import mlx_baldwhisper as mbw
from conftest import assert_words_inside_segments

pytestmark = pytest.mark.slow
CLIPS = ["jfk.flac", "1089-134686-0000.flac", "1089-134686-0001.flac",
         "1089-134691-0000.flac", "1089-134691-0001.flac"]


@pytest.fixture(scope="module")
def reference(english):
    return json.loads((english / "reference_faster_whisper_base.json").read_text())["clips"]


def test_greedy_with_timestamps_matches_reference(base_model, english, reference):
    results = mbw.transcribe([str(english / c) for c in CLIPS], path_or_hf_repo=base_model,
                             temperature=0.0)
    for clip, r in zip(CLIPS, results):
        ref = reference[clip]
        assert r["text"] == ref["text_with_timestamps"], clip
        assert r["language"] == ref["language"]
        assert len(r["segments"]) == len(ref["segments"]), clip
        for seg, rs in zip(r["segments"], ref["segments"]):
            assert seg["tokens"] == rs["tokens"]
            assert seg["start"] == pytest.approx(rs["start"], abs=1e-6)
            assert seg["end"] == pytest.approx(rs["end"], abs=1e-6)


def test_greedy_without_timestamps_matches_reference(base_model, english, reference):
    results = mbw.transcribe([str(english / c) for c in CLIPS], path_or_hf_repo=base_model,
                             temperature=0.0, without_timestamps=True)
    for clip, r in zip(CLIPS, results):
        assert r["text"] == reference[clip]["text_without_timestamps"], clip


def test_word_timestamps_on_jfk(base_model, english):
    r = mbw.transcribe(str(english / "jfk.flac"), path_or_hf_repo=base_model, temperature=0.0,
                       word_timestamps=True)
    words = [w for s in r["segments"] for w in s["words"]]
    assert [w["word"].strip(" ,.") for w in words][:5] == ["And", "so", "my", "fellow", "Americans"]
    americans = next(w for w in words if "Americans" in w["word"])
    assert 1.0 <= americans["start"] <= 2.5
    assert_words_inside_segments(r)


def test_long_file_is_transcribed_completely_in_order(base_model, english, reference, tmp_path):
    from mlx_baldwhisper.audio import load_audio

    pieces = [load_audio(str(english / c)) for c in CLIPS]
    gap = np.zeros(16000, np.float32)
    audio = np.concatenate([p for piece in pieces for p in (piece, gap)] * 2)
    assert len(audio) / 16000 > 60
    path = tmp_path / "long.wav"
    sf.write(path, audio, 16000)
    r = mbw.transcribe(str(path), path_or_hf_repo=base_model, temperature=0.0)
    text = mbw_norm(r["text"])
    cursor = 0
    for clip in CLIPS * 2:  # every clip's words appear, in order
        for word in mbw_norm(reference[clip]["text_without_timestamps"]).split()[:3]:
            found = text.find(word, cursor)
            assert found >= 0, (clip, word)
            cursor = found
    assert r["segments"][-1]["end"] > 55
    starts = [s["start"] for s in r["segments"]]
    assert starts == sorted(starts)


def mbw_norm(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum() or c.isspace())


def test_silence_returns_empty_or_short(base_model):
    r = mbw.transcribe(np.zeros(16000 * 20, np.float32), path_or_hf_repo=base_model)
    assert len(r["text"].split()) <= 3
    empty = mbw.transcribe(np.zeros(0, np.float32), path_or_hf_repo=base_model)
    assert empty["text"] == "" and empty["segments"] == []


def test_beam_search_on_jfk(base_model, english):
    r = mbw.transcribe(str(english / "jfk.flac"), path_or_hf_repo=base_model, beam_size=5,
                       language="en")
    assert "ask not what your country can do for you" in r["text"]
