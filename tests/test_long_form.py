"""Long-form evaluation: dev clips joined into long recordings, scored with transcribe()."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from conftest import tiny_model
from mlx_baldwhisper.dataset import Example
from mlx_baldwhisper.evaluate import evaluate_long_form, join_clips

# Few tokens and one temperature keep a random model's windows short.
QUICK = {"temperature": 0.0, "sample_len": 8}


def clips(folder: Path, seconds: list[float]) -> list[Example]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, s in enumerate(seconds):
        t = np.arange(int(16000 * s)) / 16000
        sf.write(folder / f"c{i}.wav", (0.2 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), 16000)
        out.append(Example(str(folder / f"c{i}.wav"), f"Clip number {i}.", "en"))
    return out


def test_join_clips_in_order_with_gaps(tmp_path):
    items = clips(tmp_path, [1.0, 1.0, 2.0, 1.0, 0.5])
    items.insert(2, Example(str(tmp_path / "missing.wav"), "gone", "en"))
    items.insert(1, Example(str(tmp_path / "c0.wav"), " ?! ", "en"))
    skipped: list = []
    recs = join_clips(items, seconds=2.5, gap=0.5, skipped=skipped)
    # 1 + 0.5 + 1 = 2.5 closes the first; 2 + 0.5 + 1 = 3.5 the second; 0.5 s is left over
    assert [r.seconds for r in recs] == [2.5, 3.5, 0.5]
    assert recs[0].text == "Clip number 0. Clip number 1." and len(recs[0].names) == 2
    assert np.all(recs[0].samples[16000:24000] == 0)  # the gap is silent
    assert [name for name, _ in skipped] == [str(tmp_path / "c0.wav"), str(tmp_path / "missing.wav")]
    with pytest.raises(ValueError, match="positive"):
        join_clips(items, seconds=0)


def test_long_form_evaluation_on_a_tiny_model(tmp_path):
    model = tiny_model()
    items = clips(tmp_path, [1.0, 1.5, 1.0, 2.0])
    r = evaluate_long_form(model, items, seconds=3.0, language="en", progress=False, **QUICK)
    assert r["n"] == 2 and r["clips"] == 4 and r["audio_seconds"] == 6.5
    assert math.isfinite(r["wer"]) and math.isfinite(r["cer"])
    assert r["rows"][0]["reference_norm"] == "clip number 0 clip number 1"
    assert r["rows"][1]["clips"] == [items[2].audio, items[3].audio]
    assert r["counts"]["words"] == 12


def test_evaluate_command_long_form(tmp_path, monkeypatch):
    from mlx_baldwhisper import evaluate as ev
    from mlx_baldwhisper.cli import main
    from mlx_baldwhisper.weights import mlx_folder

    model = tiny_model()
    mlx_folder.save(model, tmp_path / "m", model.tokenizer_dir, "test:tiny")
    items = clips(tmp_path / "clips", [1.0, 1.0, 1.0])
    (tmp_path / "dev.tsv").write_text("path\tsentence\n" + "".join(
        f"{Path(it.audio).relative_to(tmp_path)}\t{it.text}\n" for it in items))
    seen = {}
    real = ev.evaluate_long_form

    def quick(*args, **kw):
        seen.update(kw)
        return real(*args, **kw, **QUICK)

    monkeypatch.setattr(ev, "evaluate_long_form", quick)
    r = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "m"), "--data",
                                  str(tmp_path / "dev.tsv"), "--language", "en", "--sample-len", "4",
                                  "--long-form", "2", "--long-form-gap", "0.25",
                                  "--output", str(tmp_path / "hyps.tsv")])
    assert r.exit_code == 0, r.output
    assert "long-form WER" in r.output and "2 recordings of 3 clips" in r.output
    assert seen["gap"] == 0.25
    assert (tmp_path / "hyps.tsv").exists() and (tmp_path / "hyps.long.tsv").exists()
    bad = CliRunner().invoke(main, ["evaluate", "--data", str(tmp_path / "dev.tsv"), "--long-form", "0"])
    assert bad.exit_code != 0 and "long-form" in bad.output
    vad = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "m"), "--data",
                                    str(tmp_path / "dev.tsv"), "--language", "en", "--long-form", "2",
                                    "--chunking", "vad", "--no-clips"])
    assert vad.exit_code == 0, vad.output
    assert seen["chunking"] == "vad" and "chunking vad" in vad.output
    assert seen["condition_on_previous_text"] is None  # the model's config decides
    plain = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "m"), "--data",
                                      str(tmp_path / "dev.tsv"), "--language", "en", "--long-form", "2",
                                      "--no-clips", "--no-condition-on-previous-text"])
    assert plain.exit_code == 0, plain.output
    assert seen["condition_on_previous_text"] is False and "condition_on_previous_text False" in plain.output
    assert "utterances" not in vad.output  # --no-clips: the clips were not scored one by one
    lonely = CliRunner().invoke(main, ["evaluate", "--data", str(tmp_path / "dev.tsv"), "--no-clips"])
    assert lonely.exit_code != 0 and "--no-clips needs --long-form" in lonely.output


def test_results_table_has_long_form_columns():
    from mlx_baldwhisper.training.recipe import RecipeConfig, results_table

    row = {"params": 2e6, "wer": 0.5, "cer": 0.25, "train_seconds": 3, "eval_seconds": 1}
    table = results_table({"stages": {"teacher": {**row, "long_form_wer": 0.55, "long_form_cer": 0.3,
                                                  "long_form_eval_seconds": 2},
                                      "old": row}})
    assert "| long-form WER % | long-form CER % |" in table
    assert "| teacher | 2.0M | 50.00 | 25.00 | 55.00 | 30.00 | 3 | 3 |" in table
    assert "| old | 2.0M | 50.00 | 25.00 | – | – | 3 | 1 |" in table
    assert RecipeConfig().long_form_seconds == 180.0
    assert RecipeConfig.from_dict({"long_form_seconds": 0}).long_form_seconds == 0


def _window_that_ends_early(tokenizer, speech_until: float, resume: bool):
    """One 30-s window whose text is a single segment 0.00-4.00 s, over audio with speech
    (a tone) up to ``speech_until`` s: how far the seek moves, and the segment."""
    from mlx_baldwhisper.decoding import DecodingResult
    from mlx_baldwhisper.transcribe import _Stream, _segments
    from mlx_baldwhisper.vad import speech_frames

    t = np.arange(int(16000 * 30)) / 16000
    audio = np.where(t < speech_until, 0.3 * np.sin(2 * np.pi * 300 * t), 0.0).astype(np.float32)
    s = _Stream("a", None, 3000, "en", [(0, 3000)], speech=speech_frames(audio) if resume else None)
    tb = tokenizer.timestamp_begin
    tokens = [tb, *tokenizer.encode(" Hello"), tb + 200]  # <|0.00|> Hello <|4.00|>, then end of text
    segs = _segments(s, 3000, DecodingResult("en", tokens), tokenizer)
    return s.seek, segs


def test_resume_early_end_goes_on_where_the_text_stopped_if_speech_follows():
    from mlx_baldwhisper.tokenizer import get_tokenizer
    from mlx_baldwhisper.weights import embedded

    tk = get_tokenizer(embedded.folder("base")[0], True, "en", "transcribe")
    seek, segs = _window_that_ends_early(tk, speech_until=20.0, resume=True)
    assert seek == 400 and [(x["start"], x["end"]) for x in segs] == [(0.0, 4.0)]
    # openai-whisper's rule without the option, and with it when only silence follows
    assert _window_that_ends_early(tk, speech_until=20.0, resume=False)[0] == 3000
    assert _window_that_ends_early(tk, speech_until=3.9, resume=True)[0] == 3000


def test_resume_early_end_follows_the_model_config_and_keeps_tokens_when_off(tmp_path):
    from mlx_baldwhisper import transcribe

    model = tiny_model()
    t = np.arange(16000 * 40) / 16000
    audio = (0.2 * np.sin(2 * np.pi * 250 * t)).astype(np.float32)
    plain = transcribe(audio, path_or_hf_repo=model, language="en", **QUICK)
    model.extra_config["long_form"] = {"resume_early_end": False}
    assert transcribe(audio, path_or_hf_repo=model, language="en", **QUICK) == plain
    on = transcribe(audio, path_or_hf_repo=model, language="en", resume_early_end=True, **QUICK)
    assert on["segments"] and all(a["start"] <= b["start"] for a, b in zip(on["segments"], on["segments"][1:]))
    model.extra_config["long_form"] = {"resume_early_end": True}  # as the model folder sets it
    assert transcribe(audio, path_or_hf_repo=model, language="en", **QUICK) == on
    unprompted = transcribe(audio, path_or_hf_repo=model, language="en", resume_early_end=True,
                            condition_on_previous_text=False, **QUICK)
    model.extra_config["long_form"] = {"resume_early_end": True, "condition_on_previous_text": False}
    assert transcribe(audio, path_or_hf_repo=model, language="en", **QUICK) == unprompted
