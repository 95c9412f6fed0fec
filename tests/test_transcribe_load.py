"""Issue 16, item 7: many inputs in one transcribe() call are loaded lazily, so memory is
bounded by the batch, not by the number of inputs (benchmarks/memory.py measures it)."""

from __future__ import annotations

import importlib
import weakref

import numpy as np
import pytest

from conftest import tiny_model
from mlx_baldwhisper.audio import AudioError

engine = importlib.import_module("mlx_baldwhisper.transcribe")  # the module, not the function


@pytest.fixture
def watched(monkeypatch):
    """Count the mels alive at once, and keep each input's stream by its index."""
    live: list[weakref.ref] = []
    seen = {"most": 0}
    streams: dict[int, object] = {}
    mel_of, stream_of = engine.log_mel_spectrogram, engine._stream

    def mel(*args, **kw):
        out = mel_of(*args, **kw)
        live.append(weakref.ref(out))
        seen["most"] = max(seen["most"], sum(r() is not None for r in live))
        return out

    def stream(i, *args, **kw):
        s = stream_of(i, *args, **kw)
        streams[i] = s
        return s

    monkeypatch.setattr(engine, "log_mel_spectrogram", mel)
    monkeypatch.setattr(engine, "_stream", stream)
    return seen, streams, live


def test_at_most_a_batch_of_mels_alive_and_results_in_input_order(watched):
    seen, streams, live = watched
    rng = np.random.default_rng(0)
    items = [(rng.standard_normal(int(16000 * (0.3 + 0.1 * (i % 4)))) * 0.05).astype(np.float32)
             for i in range(11)]
    items[5] = np.full(4000, np.nan, np.float32)  # unreadable, in the middle
    errors = []
    results = engine.transcribe(items, path_or_hf_repo=tiny_model(), temperature=0.0,
                                language="ha", batch_size=3,
                                on_audio_error=lambda item, e: errors.append(item))
    assert len(errors) == 1 and errors[0] is items[5]
    assert seen["most"] == 3  # the batch, never more: 10 files were loaded
    assert len(live) == 10 and all(r() is None for r in live)  # every mel freed
    assert len(results) == 11 and results[5] is None
    for i, result in enumerate(results):
        if i != 5:  # each result is its own input's (the very segments of its stream)
            assert result["segments"] is streams[i].segments and result["language"] == "ha"
            assert streams[i].name == f"audio {i}"


def test_without_a_callback_an_unreadable_input_still_raises():
    items = [np.zeros(8000, np.float32), np.full(100, np.inf, np.float32)]
    with pytest.raises(AudioError):
        engine.transcribe(items, path_or_hf_repo=tiny_model(), temperature=0.0, language="en")


def test_inputs_with_nothing_to_transcribe_keep_their_place():
    rng = np.random.default_rng(1)
    items = [(rng.standard_normal(16000 * n) * 0.05).astype(np.float32) for n in (2, 1, 3, 1)]
    results = engine.transcribe(items, path_or_hf_repo=tiny_model(), temperature=0.0,
                                language="en", batch_size=2, clip_timestamps="1.5")
    assert [r["segments"] for r in results[1::2]] == [[], []]  # clips past their end: empty
    assert all(r["language"] == "en" for r in results)
