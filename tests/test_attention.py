"""The one attention function and its numpy twin: masks, the blocked encoder path, gradients."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_baldwhisper  # noqa: F401  first, so MLX picks up the optimised BLAS
from mlx_baldwhisper.backends.cpu import ops
from mlx_baldwhisper.backends.mlx import attention, causal_mask

RNG = np.random.default_rng(0)


def _qkv(b: int, h: int, t_q: int, t_k: int, d: int = 8):
    return [mx.array(RNG.standard_normal(s, dtype=np.float32))
            for s in ((b, h, t_q, d), (b, h, t_k, d), (b, h, t_k, d))]


def _padding(lengths: list[int], t_k: int) -> mx.array:
    return mx.arange(t_k)[None, :] >= mx.array(lengths)[:, None]


def test_key_padding_mask_equals_attention_over_the_unpadded_keys():
    q, k, v = _qkv(3, 2, 5, 9)
    lengths = [9, 4, 1]
    out, scores = attention(q, k, v, key_padding_mask=_padding(lengths, 9))
    for i, n in enumerate(lengths):
        ref, _ = attention(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n])
        np.testing.assert_allclose(np.array(out[i:i + 1]), np.array(ref), rtol=1e-5, atol=1e-6)
        assert (np.array(scores[i, :, :, n:]) < -1e8).all()


def test_key_padding_and_causal_masks_combine():
    q, k, v = _qkv(2, 2, 4, 4)
    out, _ = attention(q, k, v, causal_mask(4, 0, mx.float32), _padding([4, 2], 4))
    for i, n in enumerate([4, 2]):
        for row in range(4):  # row sees keys <= row, and only the first n
            seen = min(row + 1, n)
            ref, _ = attention(q[i:i + 1, :, row:row + 1], k[i:i + 1, :, :seen], v[i:i + 1, :, :seen])
            np.testing.assert_allclose(np.array(out[i, :, row]), np.array(ref[0, :, 0]),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t_q", [1, 6, ops.ROWS + 44])  # one batched product, and blocked heads
@pytest.mark.parametrize("masked", ["none", "padding", "causal", "both"])
def test_numpy_twin_equals_mlx(t_q, masked):
    t_k = t_q if masked in ("causal", "both") else 300
    q, k, v = _qkv(2, 3, t_q, t_k)
    mask = causal_mask(t_q, 0, mx.float32) if masked in ("causal", "both") else None
    pad = _padding([t_k, t_k // 2 + 1], t_k) if masked in ("padding", "both") else None
    ref, _ = attention(q, k, v, mask, pad)
    got = ops.attention(*(np.array(a) for a in (q, k, v)), None if mask is None else np.array(mask),
                        None if pad is None else np.array(pad))
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-4, atol=1e-5)


def test_numpy_kernel_takes_the_padding_mask_and_keeps_exact_gradients():
    q, k, v = _qkv(2, 2, ops.ROWS + 1, 40)
    pad = _padding([40, 17], 40)

    def loss(fn, q, k, v):
        return (fn(q, k, v, None, pad)[0] ** 2).sum()

    ref = mx.value_and_grad(lambda *a: loss(attention, *a), argnums=(0, 1, 2))(q, k, v)
    got = mx.value_and_grad(lambda *a: loss(ops.KERNELS.attention, *a), argnums=(0, 1, 2))(q, k, v)
    assert ops.KERNELS.attention(q, k, v, None, pad)[1] is None  # served by numpy
    for a, b in zip([ref[0], *ref[1]], [got[0], *got[1]]):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4)
