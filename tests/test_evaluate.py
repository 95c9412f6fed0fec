"""Text normalisation and WER/CER evaluation on a tiny random model."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mlx_baldwhisper.decoding import DecodingOptions
from mlx_baldwhisper.evaluate import evaluate, normalize, save_hypotheses
from mlx_baldwhisper.dims import ModelDimensions
from mlx_baldwhisper.model import Whisper
from mlx_baldwhisper.tokenizer import get_tokenizer
from mlx_baldwhisper.dataset import Example, prepare
from mlx_baldwhisper.features import FeatureCache
from mlx_baldwhisper.weights import embedded

FAST = DecodingOptions(language="en", without_timestamps=True, temperature=0.0, sample_len=5)


@pytest.mark.parametrize("text, expected", [
    ("Hello, World!", "hello world"),
    ("  Don't   stop\n", "dont stop"),
    ("Georege ya zana da'ira da sanda.", "georege ya zana daira da sanda"),
    ("ＡＢＣ ﬁne ²", "abc fine 2"),
    ("नमस्ते। दुनिया", "नमस्ते दुनिया"),
    ("Ƙasar Ɗan-Adam «ok» $5 + 3", "ƙasar ɗan adam ok 5 3"),
    ("¿Qué tal?", "qué tal"),
    ("...", ""),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.fixture(scope="module")
def model():
    mx_model = Whisper(ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2,
                                       n_audio_layer=1, n_vocab=51865, n_text_ctx=448, n_text_state=32,
                                       n_text_head=2, n_text_layer=2))
    mx_model.tokenizer_dir = embedded.folder("base")[0]
    mx_model.source = "test"
    return mx_model


def clips(tmp_path: Path) -> list[Example]:
    out = []
    for i in range(3):
        t = np.arange(8000 * (i + 1)) / 16000
        sf.write(tmp_path / f"c{i}.wav", (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
        out.append(Example(str(tmp_path / f"c{i}.wav"), f"Hello world number {i}.", "en"))
    (tmp_path / "bad.wav").write_bytes(b"not audio at all" * 50)
    out.append(Example(str(tmp_path / "bad.wav"), "corrupt"))
    out.append(Example(str(tmp_path / "c0.wav"), " ?! "))
    return out


def test_evaluate_tiny_model(model, tmp_path, caplog):
    examples = clips(tmp_path)
    cache = FeatureCache("tiny-test")
    with caplog.at_level(logging.WARNING):
        result = evaluate(model, examples, language="en", batch_size=2, features=cache, options=FAST)
    assert "empty reference" in caplog.text
    assert result["n"] == 3 and len(result["rows"]) == 3 and len(result["skipped"]) == 2
    assert math.isfinite(result["wer"]) and math.isfinite(result["cer"]) and result["seconds"] > 0
    row = result["rows"][0]
    assert row["reference_norm"] == "hello world number 0" and row["audio"] == examples[0].audio
    assert all(math.isfinite(r["wer"]) for r in result["rows"]) and len(cache) == 3

    again = evaluate(model, examples, language="en", features=cache, options=FAST, limit=2)
    assert again["n"] == 2 and [r["hypothesis"] for r in again["rows"]] == \
        [r["hypothesis"] for r in result["rows"][:2]]

    tk = get_tokenizer(model.tokenizer_dir, True, "en", "transcribe")
    items, _ = prepare(examples[:2], tk, 80)
    prepared = evaluate(model, items, options=FAST)
    assert prepared["n"] == 2 and math.isfinite(prepared["wer"])

    written = save_hypotheses(result, tmp_path / "out" / "hyps")
    assert [p.suffix for p in written] == [".tsv", ".json"]
    lines = written[0].read_text(encoding="utf-8").splitlines()
    assert lines[0].split("\t")[:4] == ["audio", "language", "reference", "hypothesis"] and len(lines) == 4
    assert json.loads(written[1].read_text(encoding="utf-8"))["n"] == 3
    assert save_hypotheses(result, tmp_path / "only.json") == [tmp_path / "only.json"]
