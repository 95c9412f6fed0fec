"""Losses against hand-written numpy references on small arrays."""

import mlx_baldwhisper  # noqa: F401  (first: it loads a fast BLAS before mlx.core)
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_baldwhisper.training.losses import (LearnableTemperature, cross_entropy,
                                             distillation_loss, feature_distance,
                                             kl_distillation)

RNG = np.random.default_rng(0)
B, T, V = 2, 5, 7
S = RNG.normal(size=(B, T, V)).astype(np.float32) * 2
TE = RNG.normal(size=(B, T, V)).astype(np.float32) * 2
Y = RNG.integers(0, V, size=(B, T))
M = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=np.float32)


@pytest.fixture(autouse=True, params=["numpy", "mlx"])
def loss_kernels(request, monkeypatch):
    """Every test runs on both paths: numpy kernels (Linux CPU) and plain MLX ops."""
    monkeypatch.setenv("MLX_BALDWHISPER_CPU_OPS", request.param)
    return request.param


def np_log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(s, t, mask, temp):
    s, t = s.astype(np.float64), t.astype(np.float64)
    lt, ls = np_log_softmax(t / temp), np_log_softmax(s / temp)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    return (kl * mask).sum() / mask.sum() * temp**2


def test_cross_entropy_matches_numpy():
    lp = np_log_softmax(S)
    nll = -np.take_along_axis(lp, Y[..., None], -1)[..., 0]
    ref = (nll * M).sum() / M.sum()
    got = cross_entropy(mx.array(S), mx.array(Y), mx.array(M)).item()
    assert got == pytest.approx(ref, rel=1e-5)


def test_cross_entropy_half_precision_logits():
    got = cross_entropy(mx.array(S).astype(mx.float16), mx.array(Y), mx.array(M))
    assert got.dtype == mx.float32
    ref = cross_entropy(mx.array(S), mx.array(Y), mx.array(M)).item()
    assert got.item() == pytest.approx(ref, rel=1e-2)


@pytest.mark.parametrize("temp", [0.7, 1.0, 2.5])
def test_kl_matches_numpy(temp):
    got = kl_distillation(mx.array(S), mx.array(TE), mx.array(M), mx.array(temp)).item()
    assert got == pytest.approx(np_kl(S, TE, M, temp), rel=1e-5)


def test_kl_zero_for_identical_and_no_teacher_gradient():
    assert kl_distillation(mx.array(S), mx.array(S), mx.array(M), 2.0).item() == pytest.approx(0, abs=1e-6)
    g = mx.grad(lambda t: kl_distillation(mx.array(S), t, mx.array(M), 2.0))(mx.array(TE))
    assert np.all(np.array(g) == 0)


def test_learnable_temperature_positive_clipped_and_trainable():
    temp = LearnableTemperature(init=2.0, min_value=0.5, max_value=4.0)
    assert temp().item() == pytest.approx(2.0, rel=1e-6)
    assert "log_temperature" in dict(nn.utils.tree_flatten(temp.trainable_parameters()))
    temp.log_temperature = mx.array(math.log(100.0))
    assert temp().item() == pytest.approx(4.0)
    temp.log_temperature = mx.array(-50.0)
    assert temp().item() == pytest.approx(0.5)

    # d loss / d log T against a float64 finite difference of the numpy reference
    temp.log_temperature = mx.array(math.log(1.5))

    def f(params):
        temp.update(params)
        return kl_distillation(mx.array(S), mx.array(TE), mx.array(M), temp())

    g = mx.grad(f)(temp.trainable_parameters())["log_temperature"].item()
    eps = 1e-5
    num = (np_kl(S, TE, M, 1.5 * math.exp(eps)) - np_kl(S, TE, M, 1.5 * math.exp(-eps))) / (2 * eps)
    assert g == pytest.approx(num, rel=1e-3, abs=1e-5)


def test_feature_distance_matches_numpy():
    a = RNG.normal(size=(4, 6)).astype(np.float32)
    b = RNG.normal(size=(4, 6)).astype(np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))
    ref = np.abs(a64 - b64).mean() - np.log(1 / (1 + np.exp(-cos))).mean()
    assert feature_distance(mx.array(a), mx.array(b)).item() == pytest.approx(ref, rel=1e-5)
    same = feature_distance(mx.array(a), mx.array(a)).item()
    assert same == pytest.approx(-math.log(1 / (1 + math.exp(-1))), rel=1e-5)


def test_distillation_loss_combines_terms():
    temp = mx.array(2.0)
    loss, parts = distillation_loss(mx.array(S), mx.array(TE), mx.array(Y), mx.array(M), temp,
                                    ce_weight=0.3, kl_weight=0.7)
    ce = cross_entropy(mx.array(S), mx.array(Y), mx.array(M)).item()
    assert parts["ce"].item() == pytest.approx(ce)
    assert parts["kl"].item() == pytest.approx(np_kl(S, TE, M, 2.0), rel=1e-5)
    assert loss.item() == pytest.approx(0.3 * ce + 0.7 * parts["kl"].item(), rel=1e-6)
    assert parts["temperature"].item() == 2.0


def _paths_agree(fn, *args):
    """Value and gradients of ``fn`` on the numpy path equal those on the MLX path."""
    import os

    out = {}
    for mode in ("numpy", "mlx"):
        os.environ["MLX_BALDWHISPER_CPU_OPS"] = mode
        v, g = mx.value_and_grad(fn, argnums=tuple(range(len(args))))(*args)
        out[mode] = [np.array(v)] + [np.array(x) for x in g]
    for a, b in zip(out["numpy"], out["mlx"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    return out["numpy"]


def test_numpy_kernels_match_mlx_autograd():
    """The hand-written gradients (logits and temperature) equal MLX autograd's."""
    big_s = mx.array(RNG.normal(size=(3, 4, 50)).astype(np.float32) * 4)
    big_t = mx.array(RNG.normal(size=(3, 4, 50)).astype(np.float32) * 4)
    y = mx.array(RNG.integers(0, 50, size=(3, 4)))
    m = mx.array((RNG.random((3, 4)) > 0.3).astype(np.float32))
    _, g_s, g_t = _paths_agree(lambda s, t: distillation_loss(s, big_t, y, m, t, 0.7, 1.3)[0],
                               big_s, mx.array(1.7))
    assert np.abs(g_s).max() > 1e-3 and abs(float(g_t)) > 1e-4  # real gradients, not zeros
    _paths_agree(lambda s: cross_entropy(s, y, m), big_s)
    _paths_agree(lambda s: kl_distillation(s, big_t, m, 2.5), big_s)


# Values worked out by hand on two-word vocabularies (issue 17: every loss against
# hand-computed numbers). Teacher logits [0, ln 3] are p = [1/4, 3/4]; student logits [0, 0]
# are q = [1/2, 1/2].
HAND_T = [[[0.0, math.log(3.0)], [0.0, 0.0]]]
HAND_S = [[[0.0, 0.0], [0.0, 0.0]]]


def test_cross_entropy_by_hand():
    # token 1: -ln 3/4 = 0.287682; token 2 (masked out) would be ln 2
    got = cross_entropy(mx.array(HAND_T), mx.array([[1, 0]]), mx.array([[1.0, 0.0]])).item()
    assert got == pytest.approx(0.287682, abs=1e-5)


def test_kl_by_hand():
    # T = 1: 1/4·ln(1/2) + 3/4·ln(3/2) = 0.130812 on token 1, 0 on token 2; mean over 2 tokens
    got = kl_distillation(mx.array(HAND_S), mx.array(HAND_T), mx.array([[1.0, 1.0]]), 1.0).item()
    assert got == pytest.approx(0.130812 / 2, abs=1e-5)
    # T = 2: p = [1, √3]/(1 + √3) = [0.366025, 0.633975];
    # KL = 0.366025·ln 0.732051 + 0.633975·ln 1.267949 = 0.036360, times T² = 4
    got = kl_distillation(mx.array(HAND_S), mx.array(HAND_T), mx.array([[1.0, 0.0]]), 2.0).item()
    assert got == pytest.approx(4 * 0.036360, abs=1e-4)


def test_feature_distance_by_hand():
    # orthogonal unit rows: mean |a − b| = 1, cos = 0, −ln σ(0) = ln 2
    got = feature_distance(mx.array([[1.0, 0.0]]), mx.array([[0.0, 1.0]])).item()
    assert got == pytest.approx(1 + math.log(2), abs=1e-6)


def test_hidden_state_mse_by_hand():
    from mlx_baldwhisper.training.losses import hidden_state_mse

    # layer 1: ((1−1)² + (2−0)²)/2 = 2; layer 2: ((3−0)² + (0−2)²)/2 = 6.5; mean 4.25.
    # The second token is masked out, whatever its distance.
    s = [mx.array([[[1.0, 2.0], [100.0, 0.0]]]), mx.array([[[3.0, 0.0], [0.0, 100.0]]])]
    t = [mx.array([[[1.0, 0.0], [0.0, 0.0]]]), mx.array([[[0.0, 2.0], [0.0, 0.0]]])]
    assert hidden_state_mse(s, t, mx.array([[1.0, 0.0]])).item() == pytest.approx(4.25)
