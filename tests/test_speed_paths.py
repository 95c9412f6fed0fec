"""The fast paths change speed, never results: the CPU backend's numpy kernels and numpy
decoding step against the pure-MLX path, the head-split KV cache, and gradients through
the fast kernels."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_model
from mlx_baldwhisper import backends
from mlx_baldwhisper.backends import cpu
from mlx_baldwhisper.backends.cpu import ops
from mlx_baldwhisper.backends.cpu.decode import NumpyInference
from mlx_baldwhisper.backends.mlx import MLXInference
from mlx_baldwhisper.decoding import DecodingOptions, decode, decode_features
from mlx_baldwhisper.kv_cache import KVCache


@pytest.fixture
def small_thresholds(monkeypatch):
    """Let the numpy kernels run on tiny shapes too (decoder GELU, cross-attention)."""
    monkeypatch.setattr(ops, "MIN_GELU", 0)
    monkeypatch.setattr(ops, "MIN_ATTEND", 0)


def _mel(seed: int, batch: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal((batch, 3000, 80), dtype=np.float32))


def test_env_var_selects_the_path(monkeypatch):
    monkeypatch.setenv(cpu.ENV_VAR, "mlx")
    assert not cpu.enabled()
    with cpu.inference():
        assert not cpu.active()
    monkeypatch.setenv(cpu.ENV_VAR, "numpy")
    assert cpu.enabled() and not cpu.active()  # only inside inference()
    with cpu.inference():
        assert cpu.active()
    assert not cpu.active()


def test_encoder_fast_path_matches_mlx(monkeypatch):
    model = tiny_model(seed=5, n_audio_layer=2)
    mel = _mel(0, batch=2)
    monkeypatch.setenv(cpu.ENV_VAR, "mlx")
    ref = np.array(model.embed_audio(mel))
    monkeypatch.setenv(cpu.ENV_VAR, "numpy")
    fast = np.array(model.embed_audio(mel))
    assert np.allclose(fast, ref, atol=1e-4, rtol=1e-4), np.abs(fast - ref).max()


def test_greedy_tokens_identical_on_both_paths(monkeypatch, small_thresholds):
    model = tiny_model(seed=6)
    mel = _mel(1, batch=2)
    opts = DecodingOptions(language="en", sample_len=16)
    results = {}
    for path in ("mlx", "numpy"):
        monkeypatch.setenv(cpu.ENV_VAR, path)
        results[path] = [r.tokens for r in decode(model, mel, opts)]
    assert results["numpy"] == results["mlx"]
    assert any(len(t) > 2 for t in results["mlx"])  # something was actually decoded


def test_cached_steps_equal_full_forward_with_numpy_kernels(monkeypatch, small_thresholds):
    monkeypatch.setenv(cpu.ENV_VAR, "numpy")
    for kw in ({}, {"embedding_rank": 8}, {"embedding_rank": 8, "embedding_exact_rows": 1608}):
        model = tiny_model(seed=7, **kw)
        if "embedding_exact_rows" in kw:  # the special tokens below take the exact rows
            emb = model.decoder.token_embedding
            emb.exact = mx.random.normal(emb.exact.shape)
        feats = mx.random.normal((2, 1500, 32))
        tokens = mx.array([[50258, 50259, 50359, 50363, 400, 370, 452, 7177]] * 2)
        full = model.decoder(tokens, feats)[0]  # no cache: the plain MLX forward
        with backends.decoding(model, 2) as inference:
            assert isinstance(inference, NumpyInference)
            steps = [inference.logits(tokens[:, :4], feats)]
            for i in range(4, tokens.shape[1]):
                steps.append(inference.logits(tokens[:, i:i + 1], feats))
        stepped = mx.concatenate(steps, axis=1)
        assert np.allclose(np.array(full), np.array(stepped), atol=1e-4)


def test_beam_reorder_follows_the_surviving_rows_on_both_paths(monkeypatch):
    """Both decoding states keep the history of the rows beam search keeps (the rows of
    a beam share one audio)."""
    monkeypatch.setenv(cpu.ENV_VAR, "numpy")
    model = tiny_model(seed=11)
    feats = mx.repeat(mx.random.normal((1, 1500, 32)), 3, axis=0)
    prompt = mx.array([[50258, 50259, 50359, t] for t in (400, 370, 452)])
    outs = []
    with cpu.inference():
        for state in (NumpyInference(model.decoder, 3), MLXInference(model, 3)):
            state.logits(prompt, feats)
            state.reorder(np.array([2, 2, 0]))
            outs.append(np.array(state.logits(mx.array([[7177]] * 3), feats)))
    assert np.allclose(outs[0][0], outs[0][1]) and not np.allclose(outs[0][0], outs[0][2])
    assert np.allclose(outs[0], outs[1], atol=1e-4)


def test_gradients_through_fast_kernels_are_exact(monkeypatch, small_thresholds):
    """Training may differentiate through embed_audio (full fine-tuning): the numpy
    kernels carry MLX backward passes, so gradients equal the pure-MLX ones."""
    model = tiny_model(seed=8)
    mel = _mel(2)

    def loss(m):
        return (m.embed_audio(mel) ** 2).mean()

    from mlx.utils import tree_flatten
    import mlx.nn as nn

    grads = {}
    for path in ("mlx", "numpy"):
        monkeypatch.setenv(cpu.ENV_VAR, path)
        _, g = nn.value_and_grad(model, loss)(model)
        grads[path] = dict(tree_flatten(g))
    for k, ref in grads["mlx"].items():
        if k.startswith("encoder"):
            assert np.allclose(np.array(grads["numpy"][k]), np.array(ref), atol=1e-5, rtol=1e-3), k


def test_compiled_forward_falls_back_to_mlx(monkeypatch):
    """Inside mx.compile arrays cannot be read: the kernels fall back to MLX ops."""
    model = tiny_model(seed=9)
    mel = _mel(3)
    monkeypatch.setenv(cpu.ENV_VAR, "numpy")
    eager = np.array(model.embed_audio(mel))
    compiled = np.array(mx.compile(model.embed_audio)(mel))
    assert np.allclose(eager, compiled, atol=1e-4)


def test_half_precision_fast_path_decodes(monkeypatch, small_thresholds):
    monkeypatch.setenv(cpu.ENV_VAR, "numpy")
    for dtype in (mx.float16, mx.bfloat16):
        model = tiny_model(seed=10)
        model.set_dtype(dtype)
        feats = model.embed_audio(_mel(4).astype(dtype))
        assert feats.dtype == dtype and np.isfinite(np.array(feats.astype(mx.float32))).all()
        r = decode_features(model, feats, DecodingOptions(language="en", sample_len=4))[0]
        assert r.language == "en"


def test_kv_cache_writes_in_place_and_grows_in_steps():
    cache = KVCache(batch=2, max_len=448, n_state=32, n_head=2)
    buffers = set()
    for i in range(150):
        k = mx.full((2, 2, 1, 16), float(i))
        keys, values = cache.update_heads(k, k)
        mx.eval(keys, values)
        del keys, values
        buffers.add(np.asarray(memoryview(cache._k)).__array_interface__["data"][0])
    assert cache.offset == 150 and cache.capacity == 192
    # one buffer per growth step (64, 128, 192), not one per token
    assert len(buffers) <= 3, len(buffers)
    hist = np.array(cache.keys)[:, :150]
    assert np.array_equal(hist[0, :, 0], np.arange(150, dtype=np.float32))
