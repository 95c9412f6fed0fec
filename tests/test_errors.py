"""Bad input gets one clear line naming the problem, from the API and from the CLI."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import mlx_baldwhisper as mbw
from mlx_baldwhisper.audio import AudioError
from mlx_baldwhisper.weights import ModelLoadError

FIXTURES = Path(__file__).parent / "fixtures"
TINY = str(FIXTURES / "ct2")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_baldwhisper", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def garbage(tmp_path):
    p = tmp_path / "noise.wav"
    p.write_bytes(b"this is not audio" * 100)
    return p


def test_api_errors(tmp_path, garbage):
    with pytest.raises(AudioError, match="not found"):
        mbw.transcribe(str(tmp_path / "missing.wav"), path_or_hf_repo=TINY)
    with pytest.raises(AudioError, match="cannot decode"):
        mbw.transcribe(str(garbage), path_or_hf_repo=TINY)
    with pytest.raises(AudioError, match="NaN"):
        mbw.transcribe(np.full(16000, np.nan, np.float32), path_or_hf_repo=TINY)
    with pytest.raises(ValueError, match="unknown language"):
        mbw.transcribe(np.zeros(16000, np.float32), path_or_hf_repo=TINY, language="xx")


def test_corrupt_model_folder(tmp_path):
    (tmp_path / "config.json").write_text('{"n_audio_state": 8}')
    with pytest.raises(ModelLoadError, match="no weights.safetensors"):
        mbw.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        mbw.load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        mbw.load_model(str(tmp_path / "nope"))


@pytest.mark.parametrize("case", ["missing", "garbage", "language", "model", "pickle"])
def test_cli_prints_one_line_and_exits_nonzero(case, tmp_path, garbage):
    wav = tmp_path / "ok.wav"
    sf.write(wav, np.zeros(8000, np.float32), 16000)
    args = {
        "missing": ["transcribe", str(tmp_path / "missing.wav"), "--model", TINY],
        "garbage": ["transcribe", str(garbage), "--model", TINY],
        "language": ["transcribe", str(wav), "--model", TINY, "--language", "xx"],
        "model": ["transcribe", str(wav), "--model", str(tmp_path / "nomodel")],
        "pickle": ["transcribe", str(wav), "--model", str(FIXTURES / "malicious.pt")],
    }[case]
    p = cli(*args, "-o", str(tmp_path / "out"))
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr


def test_cli_writes_every_format(tmp_path):
    wav = tmp_path / "clip.wav"
    sf.write(wav, (np.random.default_rng(0).standard_normal(16000 * 3) * 0.01).astype(np.float32), 16000)
    p = cli("transcribe", str(wav), "--model", TINY, "-o", str(tmp_path), "--language", "en",
            "--beam-size", "1")
    assert p.returncode == 0, p.stderr
    for ext in ("txt", "vtt", "srt", "tsv", "json"):
        assert (tmp_path / f"clip.{ext}").exists()
