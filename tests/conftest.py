"""Shared fixtures: tiny random models for fast tests, the real whisper-base for a few."""

from __future__ import annotations

from pathlib import Path

import mlx_baldwhisper  # noqa: F401  first, so MLX picks up the optimised BLAS
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
ENGLISH = SHARED / "data" / "english"


def tiny_dims(**kw):
    from mlx_baldwhisper.model import ModelDimensions

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


@pytest.fixture(scope="session")
def base_model():
    from mlx_baldwhisper import load_model

    return load_model()


@pytest.fixture(scope="session")
def english():
    if not ENGLISH.exists():
        pytest.fail(f"{ENGLISH} is missing: the integration tests need ../shared")
    return ENGLISH


def assert_words_inside_segments(result) -> None:
    """Each word lies inside its segment, and words start in order."""
    previous = 0.0
    for seg in result["segments"]:
        for w in seg["words"]:
            assert seg["start"] - 1e-6 <= w["start"] <= w["end"] <= seg["end"] + 1e-6
            assert w["start"] >= previous - 1e-6
            previous = w["start"]
