"""The MLX model on tiny random weights: caching, batching and beam search are exact."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_model
from mlx_baldwhisper.decoding import DecodingOptions, decode_features


def test_kv_cache_step_equals_full_forward():
    model = tiny_model()
    feats = mx.random.normal((2, 1500, 32))
    tokens = mx.array([[50258, 50259, 50359, 50363, 400, 370, 452]] * 2)
    full = model.decoder(tokens, feats)[0]
    caches = model.new_caches(2)
    first, cross, _ = model.decoder(tokens[:, :4], feats, caches)
    steps = [first]
    for i in range(4, 7):
        out, cross, _ = model.decoder(tokens[:, i:i + 1], feats, caches, cross)
        steps.append(out)
    stepped = mx.concatenate(steps, axis=1)
    assert np.allclose(np.array(full), np.array(stepped), atol=1e-4)


def test_cache_grows_past_its_step():
    model = tiny_model()
    caches = model.new_caches(1)
    k = mx.ones((1, 1, 32))
    for _ in range(70):
        caches[0].update(k, k)
    assert caches[0].offset == 70 and caches[0].keys.shape[1] >= 70


def test_batched_greedy_equals_one_by_one():
    model = tiny_model(seed=1)
    feats = mx.random.normal((3, 1500, 32))
    opts = DecodingOptions(language="en", sample_len=12)
    batch = decode_features(model, feats, opts)
    for i in range(3):
        single = decode_features(model, feats[i:i + 1], opts)[0]
        assert single.tokens == batch[i].tokens


def test_beam_search_returns_best_scoring_candidate():
    model = tiny_model(seed=2)
    feats = mx.random.normal((2, 1500, 32))
    greedy = decode_features(model, feats, DecodingOptions(language="en", sample_len=8))
    beam = decode_features(model, feats, DecodingOptions(language="en", sample_len=8, beam_size=4))
    assert len(beam) == 2
    for g, b in zip(greedy, beam):
        assert isinstance(b.text, str) and np.isfinite(b.avg_logprob)
        assert len(b.tokens) <= 8


def test_float16_and_bfloat16_models_decode():
    for dtype in (mx.float16, mx.bfloat16):
        model = tiny_model(seed=3)
        model.set_dtype(dtype)
        r = decode_features(model, mx.random.normal((1, 1500, 32)).astype(dtype),
                            DecodingOptions(language="en", sample_len=4))[0]
        assert r.language == "en"


def test_language_detection_and_unknown_language():
    from mlx_baldwhisper.tokenizer import UnknownLanguageError

    model = tiny_model(seed=4)
    r = decode_features(model, mx.random.normal((1, 1500, 32)), DecodingOptions(sample_len=3))[0]
    assert r.language_probs and abs(sum(r.language_probs.values()) - 1) < 1e-3
    with pytest.raises(UnknownLanguageError, match="unknown language 'klingon'"):
        decode_features(model, mx.random.normal((1, 1500, 32)), DecodingOptions(language="klingon"))


def test_large_v3_style_dims_128_mels_and_uneven_stacks():
    """large-v3/turbo shapes: 128 mel bins, a deep encoder and a shallow decoder."""
    from mlx_baldwhisper.audio import log_mel_spectrogram, pad_or_trim

    model = tiny_model(seed=6, n_mels=128, n_audio_layer=3, n_text_layer=1, n_text_head=4)
    mel = log_mel_spectrogram(pad_or_trim(np.zeros(16000, np.float32)), 128)[None]
    assert mel.shape == (1, 3000, 128)
    feats = model.embed_audio(mel)
    assert feats.shape == (1, 1500, 32)
    r = decode_features(model, feats, DecodingOptions(language="en", sample_len=3))[0]
    assert r.language == "en"
