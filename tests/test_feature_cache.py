"""The encoder-feature cache cannot go stale: its keys cover the encoder's weights, the mel
settings, the audio context and the audio's content; damaged entries are recomputed."""

import logging
import shutil

import mlx.core as mx
import numpy as np
import soundfile as sf
from click.testing import CliRunner

from conftest import tiny_model
from mlx_baldwhisper.cli import main
from mlx_baldwhisper.dataset import Example
from mlx_baldwhisper.features import FeatureCache, encoder_fingerprint


class Encoder:
    """Stands in for Whisper: counts its encoder calls; features = first frames of the mel."""

    class dims:
        n_mels = 80

    dtype = mx.float32

    def __init__(self):
        self.calls = 0

    def embed_audio(self, mel: mx.array) -> mx.array:
        self.calls += 1
        return mel[:, :6, :4] * 2


def tone(path, hz: float) -> str:
    sf.write(path, (0.3 * np.sin(2 * np.pi * hz * np.arange(8000) / 16000)).astype(np.float32), 16000)
    return str(path)


def test_the_encoder_key_covers_every_weight_and_the_front_end():
    model = tiny_model(0)
    base = encoder_fingerprint(model)
    w = np.array(model.encoder.conv1.weight)
    w[0, 0, 0], w[0, 0, 1] = w[0, 0, 1], w[0, 0, 0]  # a swap keeps every sum the same
    model.encoder.conv1.weight = mx.array(w)
    assert encoder_fingerprint(model) != base
    model = tiny_model(0)
    model.decoder.ln.weight = model.decoder.ln.weight + 1  # stages train only the decoder
    assert encoder_fingerprint(model) == base
    for other in (tiny_model(0, n_mels=128), tiny_model(0, n_audio_ctx=750)):
        assert encoder_fingerprint(other) != base
    model.set_dtype(mx.float16)
    assert encoder_fingerprint(model) != base


def test_the_clip_key_is_its_content_not_its_path(tmp_path):
    enc, cache = Encoder(), FeatureCache("enc", tmp_path / "cache")
    clip = Example(tone(tmp_path / "a.wav", 440), "text")
    cache.compute(enc, [clip], progress=False)
    first = np.array(cache.get(clip))
    tone(tmp_path / "a.wav", 880)  # the same path, other audio
    fresh = FeatureCache("enc", tmp_path / "cache")
    assert clip not in fresh
    fresh.compute(enc, [clip], progress=False)
    assert enc.calls == 2 and not np.array_equal(fresh.get(clip), first)
    shutil.copy(tmp_path / "a.wav", tmp_path / "b.wav")  # other path, same audio: cached
    assert Example(str(tmp_path / "b.wav"), "text") in FeatureCache("enc", tmp_path / "cache")
    assert clip not in FeatureCache("other encoder", tmp_path / "cache")


def test_damaged_entries_are_recomputed_never_used(tmp_path, caplog):
    enc = Encoder()
    clips = [Example(tone(tmp_path / f"c{i}.wav", 200 + 100 * i), "t") for i in range(4)]
    FeatureCache("enc", tmp_path / "cache").compute(enc, clips, progress=False)
    good = {c.audio: np.array(FeatureCache("enc", tmp_path / "cache").get(c)) for c in clips}
    files = sorted((tmp_path / "cache").glob("*.npy"))
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0x40  # a flipped bit inside the features
    files[0].write_bytes(bytes(data))
    files[1].write_bytes(files[1].read_bytes()[:100])  # torn
    files[2].write_bytes(b"\x93NUMPY garbage")
    for keep in (True, False):
        cache = FeatureCache("enc", tmp_path / "cache", keep_in_memory=keep)
        calls = enc.calls
        with caplog.at_level(logging.WARNING):
            cache.compute(enc, clips, progress=False)
        assert enc.calls == calls + (1 if keep else 0)  # one batch encodes the three again
        for c in clips:
            assert np.array_equal(cache.get(c), good[c.audio])
    damaged = [m for m in caplog.messages if "is damaged" in m]
    assert len(damaged) == 3 and all("encoded again" in m for m in damaged)


def test_size_report_and_clearing_delete_only_cache_files(tmp_path):
    enc, folder = Encoder(), tmp_path / "cache"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    cache = FeatureCache("enc", folder)
    cache.compute(enc, [Example(tone(tmp_path / f"c{i}.wav", 300 + i), "t") for i in range(3)],
                  progress=False)
    (folder / f"{'a' * 64}.123.tmp").write_bytes(b"left by a killed process")
    n, size = cache.disk_usage()
    assert n == 4 and size > 3 * 48
    assert f"{folder}: 4 entries" in cache.size_report() and "--clear-cache" in cache.size_report()
    assert cache.clear() == (n, size)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and len(cache) == 0


def test_clear_cache_option(corpus):
    args = ["finetune", "--model", str(corpus / "start"), "--train", str(corpus / "train.tsv"),
            "--dev", str(corpus / "dev.tsv"), "--language", "ha", "--out", str(corpus / "t"),
            "--batch-size", "2", "--eval-limit", "1", "--max-steps", "1"]
    from mlx_baldwhisper.training.recipe import RecipeConfig
    from mlx_baldwhisper.training.silence import silence_window_count

    train = len((corpus / "train.tsv").read_text().splitlines()) - 1
    n = 4 + silence_window_count(train, RecipeConfig().silence_share)  # clips, windows without speech
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and f"feature cache {corpus / 'cache'}: {n} entries" in r.output, r.output
    (corpus / "cache" / "notes.txt").write_text("mine")
    r = CliRunner().invoke(main, [*args, "--max-steps", "2", "--clear-cache"])
    assert r.exit_code == 0, r.output
    assert f"cleared the feature cache {corpus / 'cache'}: {n} entries" in r.output
    assert (corpus / "cache" / "notes.txt").exists() and len(list((corpus / "cache").glob("*.npy"))) == n
