"""Manifests, example preparation, resumable batching and the encoder-feature cache."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from mlx_baldwhisper.audio import N_FRAMES
from mlx_baldwhisper.tokenizer import UnknownLanguageError, get_tokenizer
from mlx_baldwhisper.dataset import (
    Example, ManifestError, TokenizedExample, hf_audio, prepare, read_hf_dataset, read_manifest,
    read_split,
)
from mlx_baldwhisper.features import FeatureCache
from mlx_baldwhisper.training.data import Batcher
from mlx_baldwhisper.weights import embedded


def wav(path: Path, seconds: float = 0.5, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sr * seconds)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(embedded.folder("base")[0], True, "en", "transcribe")


def test_tsv_csv_jsonl_with_relative_paths(tmp_path):
    a, b = wav(tmp_path / "audio" / "a.wav"), wav(tmp_path / "audio" / "b.wav")
    (tmp_path / "m.tsv").write_text('path\tsentence\naudio/a.wav\tsay "hi\naudio/b.wav\tsecond\n',
                                    encoding="utf-8")
    (tmp_path / "m.csv").write_text('audio,text,language\naudio/a.wav,"one, two",FR\n', encoding="utf-8")
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"audio_filepath": str(b), "transcript": "x", "duration": 0.5}) + "\n\n"
        + json.dumps({"file": "audio/a.wav", "text": "y", "locale": "sv-SE"}) + "\n", encoding="utf-8")

    tsv = read_manifest(tmp_path / "m.tsv", language="ha")
    assert [e.audio for e in tsv] == [str(a), str(b)]
    assert tsv[0].text == 'say "hi' and tsv[0].language == "ha"
    csv_ = read_manifest(tmp_path / "m.csv")
    assert csv_[0].text == "one, two" and csv_[0].language == "fr" and csv_[0].audio == str(a)
    js = read_manifest(tmp_path / "m.jsonl")
    assert js[0].duration == 0.5 and js[0].audio == str(b)
    assert js[1].language == "sv" and js[1].audio == str(a)


def test_common_voice_layout(tmp_path):
    cv = tmp_path / "cv"
    clip = wav(cv / "clips" / "common_voice_1.mp3.wav")
    (cv / "train.tsv").write_text("client_id\tpath\tsentence\tlocale\nx\tcommon_voice_1.mp3.wav\tSannu\tha\n")
    (cv / "dev.tsv").write_text("path\tsentence\nclips/common_voice_1.mp3.wav\tdev one\n")
    train = read_manifest(cv)
    assert train[0].audio == str(clip) and train[0].language == "ha"
    assert read_split(cv, "dev")[0].audio == str(clip)
    with pytest.raises(FileNotFoundError, match="dev.tsv"):
        read_split(cv, "test")


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "nope.tsv")
    (tmp_path / "bad.tsv").write_text("wav\twords\nx.wav\thi\n")
    with pytest.raises(ManifestError, match=r"found \['wav', 'words'\]"):
        read_manifest(tmp_path / "bad.tsv")


def test_prepare_skips_and_reports_bad_clips(tmp_path, tokenizer):
    good = wav(tmp_path / "good.wav", 1.0, sr=22050)
    (tmp_path / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(2000))
    long = wav(tmp_path / "long.wav", 35.0, sr=8000)
    examples = [Example(str(good), " hello world "), Example(str(tmp_path / "corrupt.wav"), "x"),
                Example(str(long), "long"), Example(str(good), "word " * 40),
                Example(str(good), "declared long", duration=31.0)]
    reported = []
    items, skipped = prepare(examples, tokenizer, 80, max_tokens=20,
                             report=lambda n, r: reported.append((n, r)))
    assert len(items) == 1 and reported == skipped
    reasons = dict((Path(n).name, r) for n, r in skipped[:3])
    assert "decode" in reasons["corrupt.wav"] and "30 s" in reasons["long.wav"]
    assert "too long" in skipped[2][1] and "30 s" in skipped[3][1]

    it = items[0]
    assert it.mel.shape == (N_FRAMES, 80) and it.mel.dtype == np.float16
    tk = tokenizer
    prompt = [tk.sot, tk.special["<|en|>"], tk.transcribe, tk.no_timestamps]
    text = tk.encode(" hello world")
    assert it.tokens.tolist() == prompt + text + [tk.eot]
    assert it.inputs.tolist() == prompt + text and it.targets.tolist() == prompt[1:] + text + [tk.eot]
    assert it.mask.tolist() == [0, 0, 0] + [1] * (len(text) + 1)


def test_prepare_language_per_example(tmp_path, tokenizer):
    good = wav(tmp_path / "a.wav")
    items, _ = prepare([Example(str(good), "sannu", language="Hausa")], tokenizer, 80)
    assert items[0].tokens[1] == tokenizer.special["<|ha|>"]
    with pytest.raises(UnknownLanguageError, match="language_aliases"):
        prepare([Example(str(good), "x", language="bm")], tokenizer, 80)
    aliased = type(tokenizer)(**{**tokenizer.__dict__, "language_aliases": {"bm": "ha"}})
    items, _ = prepare([Example(str(good), "x", language="bm")], aliased, 80)
    assert items[0].tokens[1] == tokenizer.special["<|ha|>"]


def fake_items(n: int, eot: int = 99) -> list[TokenizedExample]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        toks = np.array([1, 2] + list(rng.integers(3, 50, rng.integers(1, 9))) + [eot], np.int32)
        out.append(TokenizedExample(f"clip{i}", "t", "en", np.full((4, 2), i, np.float16), toks, 2, 1.0))
    return out


def take(b: Batcher, k: int) -> list[list[int]]:
    return [b.next_batch()["index"].tolist() for _ in range(k)]


def test_batcher_is_deterministic_and_resumable():
    items = fake_items(10)
    a, b = Batcher(items, 3, seed=7, bucket_size=6), Batcher(items, 3, seed=7, bucket_size=6)
    first = take(a, 10)  # crosses two epoch boundaries (4 batches per epoch)
    assert first == take(b, 10)
    assert take(Batcher(items, 3, seed=8, bucket_size=6), 10) != first
    epoch0 = sorted(i for batch in first[:4] for i in batch)
    assert epoch0 == list(range(10)) and first[:4] != first[4:8]

    for stop in (2, 4, 5):
        run = Batcher(items, 3, seed=7, bucket_size=6)
        take(run, stop)
        state = json.loads(json.dumps(run.state_dict()))
        resumed = Batcher(items, 3, seed=0, bucket_size=6)
        resumed.load_state_dict(state)
        assert take(resumed, 10 - stop) == first[stop:]

    it = Batcher(items, 3, seed=7, bucket_size=6)
    assert [x["index"].tolist() for x in it] == first[:4] and it.epoch == 0
    assert [x["index"].tolist() for x in it] == first[4:8] and it.epoch == 1
    with pytest.raises(ValueError, match="batches would differ"):
        Batcher(items[:5], 3).load_state_dict(state)


def test_batch_padding():
    items = fake_items(4)
    batch = Batcher(items, 4, shuffle=False).next_batch()
    t = max(len(x.tokens) for x in items) - 1
    assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (4, t)
    assert batch["inputs"].dtype == np.int32 and batch["mask"].dtype == np.float32
    assert batch["mel"].shape == (4, 4, 2)
    for k, i in enumerate(batch["index"]):
        n = len(items[i].tokens) - 1
        assert (batch["inputs"][k, n:] == 99).all() and (batch["mask"][k, n:] == 0).all()
        assert batch["mask"][k, :n].tolist() == items[i].mask.tolist()
        assert batch["targets"][k, :n].tolist() == items[i].targets.tolist()


class CountingModel:
    """Stands in for Whisper: embed_audio is a cheap function that counts its calls."""

    class dims:
        n_mels = 2

    dtype = mx.float32

    def __init__(self):
        self.calls = 0

    def embed_audio(self, mel: mx.array) -> mx.array:
        self.calls += 1
        return mel * 2


def test_feature_cache_runs_encoder_once(tmp_path):
    items, model = fake_items(5), CountingModel()
    cache = FeatureCache("enc-a", tmp_path / "feats")
    assert cache.compute(model, items, batch_size=2, progress=False) == []
    assert model.calls == 3 and len(list((tmp_path / "feats").glob("*.npy"))) == 5
    cache.compute(model, items, batch_size=2, progress=False)
    assert model.calls == 3
    assert cache.get(items[3]).dtype == np.float16 and (cache.get(items[3]) == 6).all()

    on_disk = FeatureCache("enc-a", tmp_path / "feats", keep_in_memory=False)
    assert items[3] in on_disk and (on_disk.get(items[3]) == 6).all()
    assert items[3] not in FeatureCache("enc-b", tmp_path / "feats")
    batch = Batcher(items, 2, shuffle=False, features=on_disk, include_mel=False).next_batch()
    assert batch["features"].shape == (2, 4, 2) and "mel" not in batch


def test_hf_dataset(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        read_hf_dataset("x")

    clip = wav(tmp_path / "a.wav")

    class FakeDataset(list):
        column_names = ["audio", "sentence", "locale"]

    rows = FakeDataset([{"audio": {"array": [0.0, 0.1], "sampling_rate": 8000, "path": None},
                         "sentence": "one", "locale": "ha"},
                        {"audio": {"path": str(clip), "bytes": None}, "sentence": "two", "locale": ""}])
    fake = types.SimpleNamespace(load_from_disk=lambda p: {"train": rows},
                                 load_dataset=lambda n, split: rows, Audio=None)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    ex = read_hf_dataset(str(tmp_path), "train", language="en")
    assert isinstance(ex[0].audio, tuple) and ex[0].audio[1] == 8000 and ex[0].language == "ha"
    assert ex[0].key == f"{tmp_path}:train:0" and ex[1].audio == str(clip) and ex[1].language == "en"
    with pytest.raises(ManifestError, match="found"):
        read_hf_dataset("hub/name", text_column="text")
    audio, key = hf_audio({"bytes": clip.read_bytes(), "path": "a.wav"}, "k")
    assert audio[1] == 16000 and key == "a.wav"
