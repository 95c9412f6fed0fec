"""Shared fixtures: tiny random models for fast tests, the real whisper-base for a few."""

from __future__ import annotations

from pathlib import Path

import mlx_baldwhisper  # noqa: F401  first, so MLX picks up the optimised BLAS
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
ENGLISH = SHARED / "data" / "english"
# ../shared (beside the clone) holds the project's real test recordings; users don't have it.
SHARED_REASON = "../shared is absent: integration tests on its real recordings are skipped"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=SHARED_REASON)


def tiny_dims(**kw):
    from mlx_baldwhisper.dims import ModelDimensions

    base = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                n_vocab=51865, n_text_ctx=448, n_text_state=32, n_text_head=2, n_text_layer=4)
    base.update(kw)
    return ModelDimensions(**base)


def tiny_model(seed: int = 0, **kw):
    """A random multilingual Whisper small enough to run in milliseconds."""
    import mlx.core as mx

    from mlx_baldwhisper.model import Whisper
    from mlx_baldwhisper.weights import embedded

    mx.random.seed(seed)
    model = Whisper(tiny_dims(**kw))
    mx.eval(model.parameters())
    model.tokenizer_dir = embedded.folder("base")[0]
    model.source = "test:tiny"
    return model


@pytest.fixture
def corpus(tmp_path):
    """Four noise clips with Hausa-like transcripts, manifests, and a tiny model folder ``start``."""
    import numpy as np
    import soundfile as sf

    from mlx_baldwhisper.weights import mlx_folder

    rng = np.random.default_rng(0)
    (tmp_path / "clips").mkdir()
    lines = ["path\tsentence"]
    for i, text in enumerate(["ina kwana", "sannu da zuwa", "yaya aiki", "na gode sosai"]):
        sf.write(tmp_path / "clips" / f"c{i}.wav", (rng.standard_normal(8000) * 0.05).astype(np.float32), 16000)
        lines.append(f"clips/c{i}.wav\t{text}")
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(lines[:3]) + "\n")
    model = tiny_model(seed=5)
    mlx_folder.save(model, tmp_path / "start", model.tokenizer_dir, "test:tiny")
    return tmp_path


@pytest.fixture(scope="session")
def base_model():
    from mlx_baldwhisper import load_model

    return load_model()


@pytest.fixture(scope="session")
def english():
    if not ENGLISH.exists():
        pytest.skip(SHARED_REASON)
    return ENGLISH


def assert_words_inside_segments(result) -> None:
    """Each word lies inside its segment, and words start in order."""
    previous = 0.0
    for seg in result["segments"]:
        for w in seg["words"]:
            assert seg["start"] - 1e-6 <= w["start"] <= w["end"] <= seg["end"] + 1e-6
            assert w["start"] >= previous - 1e-6
            previous = w["start"]
