"""Hostile input: model folders whose parts disagree or ask for absurd sizes, and audio
files and arrays of every odd kind. Each gets a clear error or a sane result: never a
traceback, a hang, or a large allocation."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from conftest import tiny_model
from mlx_baldwhisper import load_model
from mlx_baldwhisper.audio import AudioError, load_audio, log_mel_spectrogram
from mlx_baldwhisper.weights import ModelLoadError, mlx_folder

FIXTURES = Path(__file__).parent / "fixtures"


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def folder(tmp_path) -> Path:
    model = tiny_model()
    mlx_folder.save(model, tmp_path / "m", model.tokenizer_dir, "test:tiny")
    return tmp_path / "m"


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# -- model folders -------------------------------------------------------------------

@pytest.mark.parametrize("change,message", [
    ({"n_text_state": -32}, "n_text_state=-32 is outside the possible range"),
    ({"n_audio_layer": 10 ** 9}, "n_audio_layer=1000000000 is outside"),
    ({"n_vocab": 2 ** 40}, "n_vocab=1099511627776 is outside"),
    ({"n_mels": "80"}, "n_mels must be a whole number, not '80'"),
    ({"n_text_ctx": 448.5}, "n_text_ctx must be a whole number"),
    ({"n_audio_state": True}, "n_audio_state must be a whole number, not True"),
    ({"n_text_head": 3}, "n_text_state=32 does not split into n_text_head=3"),
    ({"embedding_rank": 0}, "embedding_rank=0 is outside"),
    ({"alignment_heads": [[7, 0]]}, "alignment_heads must be .layer, head. pairs within the model's 4 layers"),
    ({"alignment_heads": "abc"}, "alignment_heads must be"),
    ({"quantization": {"bits": 7, "group_size": 64}}, "quantization must give bits in"),
    ({"long_form": {"resume_early_end": "yes"}}, "long_form must map settings to true/false"),
    ({"long_form": [1]}, "long_form must map settings to true/false"),
])
def test_config_values_that_cannot_be(folder, change, message):
    edit_json(folder / "config.json", **change)
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(folder))


def test_config_that_is_not_an_object(folder):
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="must hold a JSON object, not list"):
        load_model(str(folder))


def test_weights_that_disagree_with_the_config(folder):
    edit_json(folder / "config.json", n_text_state=64)
    with pytest.raises(ModelLoadError, match=r"do not match its config: decoder\.blocks\.0\.attn\.key\.weight "
                                             r"is \(32, 32\) where the config needs \(64, 64\).*more"):
        load_model(str(folder))
    edit_json(folder / "config.json", n_text_state=32, n_text_layer=5)
    with pytest.raises(ModelLoadError, match=r"decoder\.blocks\.4\.attn\.key\.weight is missing"):
        load_model(str(folder))


def test_absurd_but_possible_dimensions_cost_no_memory(folder):
    """A config asking for ~25 G parameters against 2 M of weights: refused, lazily."""
    edit_json(folder / "config.json", n_audio_state=8192, n_audio_head=8, n_text_state=8192,
              n_text_head=8, n_text_layer=32, n_audio_layer=32, n_text_ctx=8192)
    p = run_python("""
        import re, sys
        from mlx_baldwhisper import load_model
        from mlx_baldwhisper.weights import ModelLoadError
        try:
            load_model(sys.argv[1])
        except ModelLoadError as e:
            print("refused:", str(e)[:200])
        # VmHWM, not ru_maxrss: on Linux the latter keeps the forking parent's peak across exec
        status = open("/proc/self/status").read()
        print("peak MB", int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) // 1024)
    """, str(folder), timeout=120)
    assert "refused: the weights of" in p.stdout and "do not match its config" in p.stdout, p.stderr
    assert int(p.stdout.split("peak MB")[1]) < 1000, p.stdout


def test_weights_of_the_wrong_dtype(folder):
    weights = mx.load(str(folder / "weights.safetensors"))
    weights["decoder.ln.weight"] = weights["decoder.ln.weight"].astype(mx.int32)
    mx.save_safetensors(str(folder / "weights.safetensors"), weights)
    with pytest.raises(ModelLoadError, match="decoder.ln.weight holds int32 values where the model "
                                             "needs floating point"):
        load_model(str(folder))
    header = json.dumps({"decoder.ln.weight": {"dtype": "F64", "shape": [32], "data_offsets": [0, 256]}})
    (folder / "weights.safetensors").write_bytes(len(header).to_bytes(8, "little") + header.encode()
                                                 + bytes(256))
    with pytest.raises(ModelLoadError, match="unsupported dtype F64"):
        load_model(str(folder))


def test_a_tokenizer_for_another_vocabulary(folder):
    tokenizer = folder / "tokenizer.json"
    original = json.loads(tokenizer.read_text())
    data = json.loads(tokenizer.read_text())
    data["added_tokens"].append({"id": 60000, "content": "<|extra|>", "special": True})
    tokenizer.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="need 60001 ids, but the model's vocabulary .* holds 51865"):
        load_model(str(folder))
    data = dict(original, added_tokens=[t for t in original["added_tokens"]
                                        if t["content"] != "<|startoftranscript|>"])
    for t in data["added_tokens"]:  # one special token fewer: the timestamps move down by one
        t["id"] -= t["id"] > 50257
    tokenizer.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="need 51864 ids"):
        load_model(str(folder))
    tokenizer.write_text(json.dumps(dict(original, added_tokens=original["added_tokens"][:3])))
    with pytest.raises(ModelLoadError, match=re.escape("not a Whisper tokenizer: it has no <|notimestamps|>")):
        load_model(str(folder))
    tokenizer.write_text("{")
    with pytest.raises(ModelLoadError, match="is not a readable tokenizer.json"):
        load_model(str(folder))


def test_the_cli_says_one_line(folder, tmp_path):
    edit_json(folder / "config.json", n_text_layer=-1)
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(1600, np.float32), 16000)
    p = subprocess.run([sys.executable, "-m", "mlx_baldwhisper", "transcribe", str(wav), "--model",
                        str(folder), "-o", str(tmp_path)], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1 and "n_text_layer=-1" in lines[0], p.stderr


# -- audio -----------------------------------------------------------------------------

def tone(sr: int, seconds: float = 1.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return np.repeat((0.3 * np.sin(2 * np.pi * 300 * t))[:, None], channels, axis=1)


def hostile_files(d: Path) -> dict[str, float]:
    """Files, with the longest a sane decode of each may be (seconds)."""
    rng = np.random.default_rng(0)
    lengths = {}

    def write(name: str, data: np.ndarray, sr: int = 16000, **kw) -> None:
        sf.write(d / name, data, sr, **kw)
        lengths[name] = len(data) / sr

    write("ok.wav", tone(16000))
    write("ok.flac", tone(16000))
    write("ok.mp3", tone(16000))
    for name in ("ok.wav", "ok.flac", "ok.mp3"):
        raw = (d / name).read_bytes()
        for frac in (0.01, 0.3, 0.7):
            (d / f"cut{frac}-{name}").write_bytes(raw[:int(len(raw) * frac)])
            lengths[f"cut{frac}-{name}"] = 1.0
    for ext in ("wav", "mp3", "flac", "ogg"):
        (d / f"random.{ext}").write_bytes(rng.bytes(4000))
        lengths[f"random.{ext}"] = 0.0
    (d / "empty.wav").write_bytes(b"")
    lengths["empty.wav"] = 0.0
    write("one-sample.wav", np.array([0.5], np.float32))
    write("six-channels.wav", tone(16000, 1.0, 6))
    write("8k.wav", tone(8000), 8000)
    write("96k.wav", tone(96000), 96000)
    for subtype in ("PCM_16", "PCM_32", "DOUBLE", "PCM_U8"):
        write(f"{subtype}.wav", tone(16000), subtype=subtype)
    for bad in ("nan", "inf"):
        data = tone(16000)
        data[100] = float(bad)
        write(f"{bad}.wav", data, subtype="FLOAT")
    os.mkfifo(d / "pipe.wav")  # reading it would wait forever
    lengths["pipe.wav"] = 0.0
    return lengths


def test_audio_fuzz_files(tmp_path):
    lengths = hostile_files(tmp_path)
    p = run_python("""
        import json, sys
        from pathlib import Path
        import numpy as np
        from mlx_baldwhisper.audio import AudioError, load_audio, log_mel_spectrogram
        out = {}
        for f in sorted(Path(sys.argv[1]).iterdir()):
            try:
                a = load_audio(f)
                mel = np.array(log_mel_spectrogram(a, padding=480000))
                out[f.name] = ["ok", str(a.dtype), a.ndim, len(a) / 16000, bool(np.isfinite(mel).all())]
            except AudioError as e:
                out[f.name] = ["error", str(e)]
            except Exception as e:
                out[f.name] = ["crash", type(e).__name__, str(e)]
        print(json.dumps(out))
    """, str(tmp_path), timeout=120)  # a hang fails here
    results = json.loads(p.stdout.splitlines()[-1])
    assert set(results) == set(lengths)
    for name, r in results.items():
        assert r[0] in ("ok", "error"), (name, r)
        if r[0] == "ok":
            assert r[1:3] == ["float32", 1] and r[4] and r[3] <= lengths[name] + 0.01, (name, r)
        else:
            assert str(tmp_path / name) in r[1], (name, r)
    expected_errors = {"random.wav", "random.flac", "empty.wav", "nan.wav", "inf.wav", "pipe.wav"}
    assert expected_errors <= {n for n, r in results.items() if r[0] == "error"}
    assert "not a regular file" in results["pipe.wav"][1]
    for name in ("ok.wav", "ok.mp3", "one-sample.wav", "six-channels.wav", "8k.wav", "96k.wav",
                 "PCM_16.wav", "PCM_32.wav", "DOUBLE.wav", "PCM_U8.wav", "cut0.7-ok.wav"):
        assert results[name][0] == "ok" and results[name][3] > 0, (name, results[name])


RAMP = np.linspace(-0.5, 0.5, 10)


@pytest.mark.parametrize("array,expected", [
    (np.array([0, 16384, -32768], np.int16), [0.0, 0.5, -1.0]),
    (np.array([0, 2 ** 30], np.int32), [0.0, 0.5]),
    (np.array([128, 192, 0], np.uint8), [0.0, 0.5, -1.0]),
    (np.array([0.25], np.float64), [0.25]),
    (np.tile(RAMP, (6, 1)), RAMP),  # 6 channels x 10 samples
    (np.tile(RAMP[:, None], (1, 6)), RAMP),  # 10 samples x 6 channels
    (mx.array([0.5, -0.5]).astype(mx.bfloat16), [0.5, -0.5]),
    (np.zeros((0, 6), np.float32), []),
])
def test_audio_arrays(array, expected):
    audio = load_audio(array)
    assert audio.dtype == np.float32 and audio.ndim == 1
    np.testing.assert_allclose(audio, expected, atol=1e-6)
    assert np.isfinite(np.array(log_mel_spectrogram(audio, padding=480000))).all()


@pytest.mark.parametrize("array,message", [
    (np.array([0.0, np.nan]), "NaN or infinite"),
    (np.array([np.inf]), "NaN or infinite"),
    (np.array([1e300, 0.0]), "NaN or infinite"),  # too large for float32
    (np.ones(3, bool), "must be float or integer"),
    (np.ones((2, 2, 2)), "1-D or 2-D"),
    ([[0.1, 0.2], [0.3]], "must be an array of samples"),
])
def test_audio_arrays_refused(array, message):
    with pytest.raises(AudioError, match=message):
        load_audio(array)


def test_hostile_sample_rates(tmp_path):
    from mlx_baldwhisper.dataset import load_samples

    for sr in (0, -8000, 1, 10 ** 9):
        with pytest.raises(AudioError, match=f"unsupported sample rate {sr} Hz"):
            load_samples((np.zeros(100, np.float32), sr))
