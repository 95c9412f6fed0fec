"""The energy VAD, and transcribe(chunking="vad") built on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from conftest import tiny_model
from mlx_baldwhisper.vad import VadOptions, chunks, speech_regions

SR = 16000


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(SR * seconds), np.float32)


def seconds(spans) -> list[tuple[float, float]]:
    return [(round(a / SR, 2), round(b / SR, 2)) for a, b in spans]


# speech at 0.5-2.5, 3.5-6.5 and 7.0-9.25 (a 0.25-s pause inside is too short to cut at)
PARTS = [silence(0.5), tone(2), silence(1), tone(3), silence(0.5), tone(1), silence(0.25), tone(1), silence(2)]


def test_vad_splits_tone_and_silence_at_the_silences():
    audio = np.concatenate(PARTS)
    assert seconds(speech_regions(audio)) == [(0.3, 2.7), (3.3, 6.7), (6.8, 9.46)]
    assert seconds(chunks(audio)) == [(0.3, 9.46)]  # all fits one 30-s chunk
    short = chunks(audio, VadOptions(max_chunk_seconds=4))
    assert seconds(short) == [(0.3, 2.7), (3.3, 6.7), (6.8, 9.46)]
    cuts = [b for _, b in short[:-1]] + [a for a, _ in short[1:]]
    speech = np.abs(audio) > 0
    for c in cuts:  # every cut lies in a silence
        assert not speech[c - 10:c + 10].any()

    noisy = audio + np.random.default_rng(0).standard_normal(audio.size).astype(np.float32) * 0.01
    assert seconds(speech_regions(noisy)) == [(0.3, 2.7), (3.3, 6.7), (6.8, 9.46)]
    quiet = audio * 0.01  # the threshold follows the file's level
    assert seconds(speech_regions(quiet)) == seconds(speech_regions(audio))


def test_vad_chunks_never_exceed_the_limit():
    audio = np.concatenate([tone(70), silence(1), tone(20), silence(1), tone(5)])
    spans = chunks(audio)
    assert all(b - a <= 30 * SR for a, b in spans)
    assert spans[0][0] == 0 and spans[-1][1] == audio.size  # everything heard is covered
    assert all(b0 <= a1 for (_, b0), (a1, _) in zip(spans, spans[1:]))
    assert seconds(spans)[-2:] == [(59.86, 70.2), (70.8, 97.0)]  # 20 + 1 + 5 s fit one chunk
    assert chunks(silence(5)) == [] and chunks(np.zeros(0, np.float32)) == []
    with pytest.raises(ValueError):
        VadOptions(pad_seconds=-1)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_transcribe_vad_segments_come_from_the_cuts(model, tmp_path):
    from mlx_baldwhisper import transcribe

    audio = np.concatenate([silence(1), tone(20), silence(2), tone(15, 300), silence(3), tone(4, 500)])
    quick = dict(path_or_hf_repo=model, language="en", temperature=0.0, sample_len=6,
                 no_speech_threshold=None, verbose=None)
    result = transcribe(audio, chunking="vad", **quick)
    cuts = seconds(chunks(audio))
    assert len(cuts) == 2  # 20 s + 15 s do not fit one chunk; 15 s + 4 s do
    spans = [(s["start"], s["end"]) for s in result["segments"]]
    assert spans and set(spans) <= set(cuts) and spans == sorted(spans)
    assert result["text"] == "".join(s["text"] for s in result["segments"])
    assert [s["id"] for s in result["segments"]] == list(range(len(spans)))
    assert result["language"] == "en"

    sf.write(tmp_path / "a.wav", audio, SR)
    both = transcribe([str(tmp_path / "a.wav"), silence(3)], chunking="vad", batch_size=3, **quick)
    keys = ("start", "end", "tokens")  # batched with other inputs: the same chunks and text
    assert [[s[k] for k in keys] for s in both[0]["segments"]] == \
        [[s[k] for k in keys] for s in result["segments"]]
    assert both[1] == {"text": "", "segments": [], "language": "en"}
    short = transcribe(audio, chunking="vad", vad_parameters={"max_chunk_seconds": 10}, **quick)
    short_cuts = seconds(chunks(audio, VadOptions(max_chunk_seconds=10)))
    assert len(short_cuts) > len(cuts) and all(b - a <= 10 for a, b in short_cuts)
    assert {(s["start"], s["end"]) for s in short["segments"]} <= set(short_cuts)
    default = transcribe(audio, **quick)  # sequential stays the default
    assert default == transcribe(audio, chunking="sequential", **quick)


def test_bad_chunking_is_a_clear_error(model):
    from mlx_baldwhisper import transcribe

    with pytest.raises(ValueError, match="chunking must be one of sequential, vad"):
        transcribe(silence(1), path_or_hf_repo=model, chunking="silero")
    with pytest.raises(ValueError, match="word_timestamps needs chunking='sequential'"):
        transcribe(silence(1), path_or_hf_repo=model, chunking="vad", word_timestamps=True)
    with pytest.raises(ValueError, match="clip_timestamps"):
        transcribe(silence(1), path_or_hf_repo=model, chunking="vad", clip_timestamps="1,2")
    with pytest.raises(ValueError, match="unknown vad_parameters max_speech_duration_s"):
        transcribe(silence(1), path_or_hf_repo=model, chunking="vad",
                   vad_parameters={"max_speech_duration_s": 10})


def test_transcribe_command_chunking(model, tmp_path):
    from mlx_baldwhisper.cli import main
    from mlx_baldwhisper.weights import mlx_folder

    mlx_folder.save(model, tmp_path / "m", model.tokenizer_dir, "test:tiny")
    sf.write(tmp_path / "a.wav", np.concatenate([tone(3), silence(1), tone(2)]), SR)
    base = ["transcribe", str(tmp_path / "a.wav"), "--model", str(tmp_path / "m"), "--language", "en",
            "-o", str(tmp_path / "out"), "-f", "json", "--temperature_increment_on_fallback", "None"]
    r = CliRunner().invoke(main, [*base, "--chunking", "vad", "--no_speech_threshold", "None"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "a.json").exists()
    bad = CliRunner().invoke(main, [*base, "--chunking", "energy"])
    assert bad.exit_code == 2 and "'energy' is not one of 'sequential', 'vad'" in bad.output
    short = CliRunner().invoke(main, [*base, "--chunking", "vad", "--vad-max-chunk", "2",
                                      "--no_speech_threshold", "None"])
    assert short.exit_code == 0, short.output
    alone = CliRunner().invoke(main, [*base, "--vad-max-chunk", "2"])
    assert alone.exit_code == 2 and "--vad-max-chunk needs --chunking vad" in alone.output
    clash = CliRunner().invoke(main, [*base, "--chunking", "vad", "--word_timestamps", "True"])
    assert clash.exit_code == 2 and "--chunking vad" in clash.output
