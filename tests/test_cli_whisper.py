"""The transcribe command as an openai-whisper user types it, and the loop behind it.

Option parsing is checked with the transcription function replaced by a recorder; the
rest runs a tiny random model (tests/fixtures/ct2) or conftest's tiny_model().
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from conftest import tiny_model
from mlx_baldwhisper import _blas
from mlx_baldwhisper.backends.cpu import ops as cpu_ops
from mlx_baldwhisper.cli import main

engine = importlib.import_module("mlx_baldwhisper.transcribe")  # the module, not the function
TINY = str(Path(__file__).parent / "fixtures" / "ct2")
FAST = ["--model", TINY, "--language", "en", "--beam_size", "1",
        "--temperature_increment_on_fallback", "None"]


def noise(path: Path, seconds: float, seed: int = 0) -> str:
    samples = np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.01
    sf.write(path, samples.astype(np.float32), 16000)
    return str(path)


@pytest.fixture
def wav(tmp_path) -> str:
    return noise(tmp_path / "clip.wav", 2)


@pytest.fixture
def recorded(monkeypatch) -> list[dict]:
    """Replace the transcription with a recorder of its keyword arguments."""
    calls: list[dict] = []

    def run(items, **kw):
        calls.append({**kw, "threads": _blas.encoder_threads(), "workers": cpu_ops._workers()})
        return [{"text": " hi", "segments": [], "language": "en"} for _ in items]

    monkeypatch.setattr(engine, "transcribe", run)
    return calls


def invoke(*args: str):
    return CliRunner().invoke(main, ["transcribe", *args], catch_exceptions=False)


def options_for(recorded: list[dict], wav: str, tmp_path: Path, *args: str) -> dict:
    result = invoke(wav, "-o", str(tmp_path), *args)
    assert result.exit_code == 0, result.output
    return recorded[-1]


# ---- openai-whisper's spellings -------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["--beam_size", "3"], {"beam_size": 3}),
    (["--beam-size", "1"], {"beam_size": None}),
    (["--best_of", "2", "--patience", "2"], {"best_of": 2, "patience": 2.0}),
    (["--initial_prompt", "--not_an_option"], {"initial_prompt": "--not_an_option"}),
    (["--initial_prompt=Hello there."], {"initial_prompt": "Hello there."}),
    (["--word_timestamps", "True"], {"word_timestamps": True}),
    (["--word_timestamps=true"], {"word_timestamps": True}),
    (["--word-timestamps"], {"word_timestamps": True}),
    (["--word_timestamps", "True", "--no-word-timestamps"], {"word_timestamps": False}),
    ([], {"word_timestamps": False, "condition_on_previous_text": None, "verbose": True,
          "without_timestamps": False, "dtype": "float32", "clip_timestamps": "0",
          "hallucination_silence_threshold": None}),
    (["--condition_on_previous_text", "False"], {"condition_on_previous_text": False}),
    (["--condition_on_previous_text", "no"], {"condition_on_previous_text": False}),
    (["--no-condition-on-previous-text"], {"condition_on_previous_text": False}),
    (["--verbose", "False"], {"verbose": False}),
    (["--verbose", "FALSE", "--verbose", "1"], {"verbose": True}),
    (["--without_timestamps", "True"], {"without_timestamps": True}),
    (["--fp16", "False"], {"dtype": "float32"}),
    (["--dtype", "bfloat16"], {"dtype": "bfloat16"}),
    (["--task", "translate", "--language", "de"], {"task": "translate", "language": "de"}),
    (["--prepend_punctuations", "¿", "--append_punctuations", ".!"],
     {"prepend_punctuations": "¿", "append_punctuations": ".!"}),
    (["--clip_timestamps", "1.5,3,10"], {"clip_timestamps": "1.5,3,10"}),
    (["--word_timestamps", "True", "--hallucination_silence_threshold", "2"],
     {"hallucination_silence_threshold": 2.0}),
    (["--logprob_threshold", "None", "--no_speech_threshold", "none",
      "--compression_ratio_threshold", "None"],
     {"logprob_threshold": None, "no_speech_threshold": None, "compression_ratio_threshold": None}),
    (["--temperature", "0.2", "--temperature_increment_on_fallback", "0.4"],
     {"temperature": (0.2, 0.6, 1.0)}),
    (["--temperature_increment_on_fallback", "None"], {"temperature": (0.0,)}),
    (["--suppress_tokens", "-1,220"], {"suppress_tokens": "-1,220"}),
])
def test_openai_whisper_spellings(recorded, wav, tmp_path, args, expected):
    got = options_for(recorded, wav, tmp_path, *args)
    assert {k: got[k] for k in expected} == expected


def test_output_options_with_underscores(recorded, wav, tmp_path):
    out = tmp_path / "sub" / "dir"
    result = invoke(wav, "--output_dir", str(out), "--output_format", "srt",
                    "--word_timestamps", "True", "--highlight_words", "True",
                    "--max_line_width", "20", "--max_line_count", "2", "--max_words_per_line", "3")
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["clip.srt"]


@pytest.mark.parametrize("args, message", [
    (["--word_timestamps", "maybe"], "--word_timestamps expects True or False, got 'maybe'"),
    (["--fp16=perhaps"], "--fp16 expects True or False"),
    (["--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
    (["--beam_size", "-3"], "'--beam-size': -3 is not in the range x>=1"),
    (["--best_of", "0"], "'--best-of': 0 is not in the range x>=1"),
    (["--threads", "-1"], "'--threads': -1 is not in the range x>=0"),
    (["--temperature", "1.5"], "'--temperature': 1.5 is not in the range 0<=x<=1"),
    (["--max_line_width", "0"], "'--max-line-width': 0 is not in the range x>=1"),
    (["--no_speech_threshold", "2"], "'--no-speech-threshold'"),
    (["--patience", "0"], "'--patience'"),
    (["--clip_timestamps", "5,2"], "each clip must end after it starts"),
    (["--clip_timestamps", "1,abc"], "comma-separated seconds"),
    (["--suppress_tokens", "a,b"], "comma-separated token ids"),
    (["--fp16", "True", "--dtype", "float32"], "--fp16 True contradicts --dtype float32"),
    (["--highlight_words", "True"], "need --word_timestamps True"),
    (["--hallucination_silence_threshold", "2"], "needs --word_timestamps True"),
    (["--beam_sise", "2"], "No such option"),
])
def test_bad_values_are_usage_errors(recorded, wav, tmp_path, args, message):
    result = invoke(wav, "-o", str(tmp_path), *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not recorded


def test_every_option_has_help():
    command = main.commands["transcribe"]
    assert all(p.help for p in command.params if p.param_type_name == "option")


def test_fp16_on_a_linux_cpu_falls_back_to_float32(recorded, wav, tmp_path):
    import mlx.core as mx

    if mx.default_device() != mx.cpu or not sys.platform.startswith("linux"):
        pytest.skip("float16 is only refused on Linux's CPU")
    with pytest.warns(UserWarning, match="FP16 is much slower"):
        got = options_for(recorded, wav, tmp_path, "--fp16", "True")
    assert got["dtype"] == "float32"


def test_threads_reach_the_encoder_kernels(recorded, wav, tmp_path):
    default = (_blas.encoder_threads(), cpu_ops._workers())
    got = options_for(recorded, wav, tmp_path, "--threads", "3")
    assert (got["threads"], got["workers"]) == (3, 3)
    got = options_for(recorded, wav, tmp_path, "--threads", "0")
    assert (got["threads"], got["workers"]) == default
    assert (_blas.encoder_threads(), cpu_ops._workers()) == default  # restored afterwards


# ---- verbose, as openai-whisper ---------------------------------------------------------

SEGMENT_LINE = re.compile(r"^\[\d\d:\d\d\.\d{3} --> \d\d:\d\d\.\d{3}\] ", re.M)


def test_verbose_by_default_and_a_progress_bar_when_false(tmp_path, wav):
    loud = invoke(wav, "-o", str(tmp_path), *FAST[:2], "--beam_size", "1",
                  "--temperature_increment_on_fallback", "None")
    assert loud.exit_code == 0, loud.output
    assert SEGMENT_LINE.search(loud.stdout) and "Detected language: " in loud.stdout
    quiet = invoke(wav, "-o", str(tmp_path), *FAST, "--verbose", "False")
    assert quiet.exit_code == 0, quiet.output
    assert not SEGMENT_LINE.search(quiet.stdout)
    assert "frames" in quiet.stderr and "100%" in quiet.stderr


def test_api_verbose_none_false_true(capsys):
    model = tiny_model()
    audio = np.random.default_rng(0).standard_normal(16000 * 2).astype(np.float32) * 0.01
    kw = dict(path_or_hf_repo=model, temperature=0.0)
    engine.transcribe(audio, verbose=None, **kw)
    silent = capsys.readouterr()
    assert silent.out == "" and silent.err == ""
    engine.transcribe(audio, verbose=False, **kw)
    bar = capsys.readouterr()
    assert "Detected language: " in bar.out and not SEGMENT_LINE.search(bar.out)
    assert "frames" in bar.err
    engine.transcribe(audio, verbose=True, **kw)
    loud = capsys.readouterr()
    assert "Detected language: " in loud.out and SEGMENT_LINE.search(loud.out) and loud.err == ""


# ---- one bad file among several -------------------------------------------------------

def test_unreadable_files_are_reported_and_the_rest_written(tmp_path):
    good = noise(tmp_path / "good.wav", 2, seed=1)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"this is not audio" * 100)
    missing = str(tmp_path / "missing.wav")
    good2 = noise(tmp_path / "good2.wav", 1, seed=2)
    out = tmp_path / "out"
    result = invoke(good, str(broken), missing, good2, "-o", str(out), "-f", "txt",
                    "--batch_size", "3", *FAST)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert f"error: {broken}: cannot decode broken.wav as audio" in "\n".join(lines)
    assert f"error: {missing}: audio file not found" in "\n".join(lines)
    assert lines[-1] == "2 of 4 files failed"
    assert sorted(p.name for p in out.iterdir()) == ["good.txt", "good2.txt"]


def test_api_reports_unreadable_items_to_a_callback(tmp_path):
    good = noise(tmp_path / "good.wav", 1)
    errors = []
    results = engine.transcribe([str(tmp_path / "nope.wav"), good], path_or_hf_repo=tiny_model(),
                                temperature=0.0, on_audio_error=lambda item, e: errors.append((item, e)))
    assert results[0] is None and results[1]["language"]
    assert errors[0][0].endswith("nope.wav") and "not found" in str(errors[0][1])


# ---- error lines never share a line with a progress bar ------------------------------

def test_error_after_a_progress_bar_starts_on_its_own_line(monkeypatch, wav, tmp_path):
    from tqdm import tqdm

    def run(items, **kw):
        bar = tqdm(total=10, unit="frames", file=sys.stderr)
        bar.update(3)
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "transcribe", run)
    result = invoke(wav, "-o", str(tmp_path), "--verbose", "False")
    assert result.exit_code == 1
    assert "3/10" in result.stderr
    assert re.search(r"(^|\n)error: RuntimeError: boom\n$", result.stderr), repr(result.stderr)


# ---- clip_timestamps ------------------------------------------------------------------

def test_parse_clip_timestamps():
    assert engine.parse_clip_timestamps("0") == [0.0]
    assert engine.parse_clip_timestamps("1.5, 3,10") == [1.5, 3.0, 10.0]
    assert engine.parse_clip_timestamps([2, 4]) == [2.0, 4.0]
    assert engine._clips([1.5, 3.0, 10.0], 1200) == [(150, 300), (1000, 1200)]
    assert engine._clips([1.0, 2.0, 30.0, 40.0], 1200) == [(100, 200)]  # past the end: dropped
    assert engine._clips([], 500) == [(0, 500)]
    for bad in ("a", "-1", "3,1", "nan"):
        with pytest.raises(ValueError):
            engine.parse_clip_timestamps(bad)


def test_clip_timestamps_decode_only_the_clips(monkeypatch):
    windows = []
    real = engine._window

    def spy(model, tokenizer, streams, *args):
        windows.extend((s.seek, s.clip_end) for s in streams)
        return real(model, tokenizer, streams, *args)

    monkeypatch.setattr(engine, "_window", spy)
    audio = np.random.default_rng(3).standard_normal(16000 * 8).astype(np.float32) * 0.01
    result = engine.transcribe(audio, path_or_hf_repo=tiny_model(), temperature=0.0,
                               clip_timestamps="1,3,5")
    assert windows[0] == (100, 300)
    assert all(100 <= seek < 300 or 500 <= seek < 800 for seek, _ in windows), windows
    assert any(seek >= 500 for seek, _ in windows), windows
    assert all(100 <= seg["seek"] < 300 or 500 <= seg["seek"] < 800 for seg in result["segments"])


# ---- hallucination_silence_threshold --------------------------------------------------

def words(*spec: tuple[str, float, float, float]) -> list[dict]:
    return [{"word": w, "start": s, "end": e, "probability": p} for w, s, e, p in spec]


def seg(start: float, end: float, ws: list[dict]) -> dict:
    return {"seek": 0, "start": start, "end": end, "text": "".join(w["word"] for w in ws),
            "tokens": [1], "words": ws}


SPEECH = seg(0.0, 2.0, words((" We", 0.0, 0.4, 0.9), (" went", 0.5, 0.9, 0.8), (" home.", 1.0, 2.0, 0.9)))
GHOST = seg(20.0, 20.1, words((" Thanks", 20.0, 20.05, 0.05), (" for", 20.05, 20.1, 0.1)))
PUNCT = "\"'“¿([{-\"'.。,，!！?？:：”)]}、"


def stream(content_seconds: float = 60.0, last_speech: float = 0.0):
    s = engine._Stream("x", None, int(content_seconds * 100), "en", [(0, int(content_seconds * 100))])
    s.seek, s.last_speech = 3000, last_speech  # as _segments leaves it after a full window
    return s


def test_real_speech_is_kept():
    s = stream()
    assert engine._skip_hallucinations(s, [SPEECH], 0, 3000, 2.0, PUNCT) == [SPEECH]
    assert s.seek == 3000
    assert not engine._looks_hallucinated(SPEECH, PUNCT) and engine._looks_hallucinated(GHOST, PUNCT)


def test_hallucination_in_silence_is_dropped_and_the_silence_skipped():
    s = stream()
    assert engine._skip_hallucinations(s, [SPEECH, GHOST], 0, 3000, 2.0, PUNCT) == [SPEECH]
    assert s.seek == 2000  # the next window starts at the doubtful words, after the silence


def test_leading_silence_before_doubtful_words_is_skipped():
    s = stream()
    assert engine._skip_hallucinations(s, [GHOST, SPEECH], 0, 3000, 2.0, PUNCT) == []
    assert s.seek == 2000
    s = stream(last_speech=19.5)  # doubtful words right after speech stay
    assert engine._skip_hallucinations(s, [GHOST], 1950, 3000, 2.0, PUNCT) == [GHOST]


def test_hallucination_near_the_end_finishes_the_file():
    s = stream(content_seconds=21.0)
    assert engine._skip_hallucinations(s, [SPEECH, GHOST], 0, 2100, 2.0, PUNCT) == [SPEECH]
    assert s.seek == s.content_frames


def test_hallucination_threshold_end_to_end_terminates():
    audio = np.random.default_rng(4).standard_normal(16000 * 40).astype(np.float32) * 0.01
    kw = dict(path_or_hf_repo=tiny_model(), temperature=0.0, word_timestamps=True)
    result = engine.transcribe(audio, hallucination_silence_threshold=0.5, **kw)
    seeks = [s["seek"] for s in result["segments"]]
    assert seeks == sorted(seeks) and all(s < 4000 for s in seeks)
    with pytest.warns(UserWarning, match="needs word_timestamps"):
        engine.transcribe(audio[:16000], path_or_hf_repo=kw["path_or_hf_repo"], temperature=0.0,
                          hallucination_silence_threshold=1.0)


@pytest.mark.slow
def test_real_speech_survives_clips_and_the_hallucination_filter(base_model):
    from mlx_baldwhisper.audio import load_audio

    jfk = load_audio(str(Path(engine.__file__).parent / "assets" / "jfk.flac"))
    kw = dict(path_or_hf_repo=base_model, temperature=0.0, language="en")
    first = engine.transcribe(jfk, clip_timestamps="0,3.5", **kw)
    assert "fellow Americans" in first["text"] and "country" not in first["text"]
    audio = np.concatenate([jfk, np.zeros(16000 * 20, np.float32), jfk])
    result = engine.transcribe(audio, word_timestamps=True, hallucination_silence_threshold=2.0, **kw)
    assert result["text"].count("ask not what your country can do for you") == 2, result["text"]
    words = [w for s in result["segments"] for w in s["words"]]
    assert not [w for w in words if 12.0 < w["start"] < 30.0], "words in the silence"
