"""Per-token CE and distillation KL over the 51,865-way vocabulary, in numpy, for Linux CPU.

A training step's loss touches every logit of every target token (8 x 50 x 51,865 ≈ 20M
values) a dozen times forward and backward. MLX's CPU element-wise kernels are scalar on
Linux/x86 (see ops.py), so those passes cost ~2 s per step, as much as the decoder;
numpy's vectorised ``exp``/``log`` do them in a fraction of that. These are
``mx.custom_function``s with hand-written gradients (checked against MLX autograd in
``tests/test_losses.py``), used only where the CPU backend is enabled; training/losses.py
keeps the plain MLX path for Metal and inside ``mx.compile``.

Gradients, for rows z (student), zt (teacher, no gradient), temperature t, u = z/t,
ut = zt/t, p = softmax(z), ps = softmax(u), pt = softmax(ut), KL = Σ pt (log pt − log ps):
  ∂CE/∂z = p − onehot(target)          ∂KL/∂z = (ps − pt) / t
  ∂KL/∂t = −(1/t) · [Σ (ps − pt)·u + Σ pt·(log pt − log ps − KL)·ut]
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import enabled
from .ops import TRANSFORM_ERRORS, host, log_softmax


def _rows(x: mx.array) -> np.ndarray:
    h = host(x)
    return h.reshape(-1, h.shape[-1])


def _ce_rows(z: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logp = log_softmax(z)
    return -logp[np.arange(len(z)), targets]


def _kl_parts(z: np.ndarray, zt: np.ndarray, t: float):
    log_ps, log_pt = log_softmax(z / t), log_softmax(zt / t)
    pt = np.exp(log_pt)
    gap = log_pt - log_ps
    return log_ps, pt, gap, (pt * gap).sum(axis=-1)


def _targets(targets: mx.array) -> np.ndarray:
    return np.asarray(targets).reshape(-1).astype(np.int64)


def _ce_grad(rows: np.ndarray, targets: np.ndarray, cotangent: mx.array) -> np.ndarray:
    """cotangent · (softmax(z) − onehot(target)), row by row."""
    dce = host(cotangent).reshape(-1, 1)
    g = np.exp(log_softmax(rows))
    g *= dce
    g[np.arange(len(rows)), targets] -= dce[:, 0]
    return g


@mx.custom_function
def ce_rows(z: mx.array, targets: mx.array) -> mx.array:
    """-log softmax(z)[target] per row; z (..., V), targets (...)."""
    return mx.array(_ce_rows(_rows(z), _targets(targets)).reshape(targets.shape))


@ce_rows.vjp
def _ce_rows_vjp(primals, cotangent, output):
    z, targets = primals
    g = _ce_grad(_rows(z), _targets(targets), cotangent)
    return mx.array(g.reshape(z.shape)).astype(z.dtype), mx.zeros_like(targets)


@mx.custom_function
def ce_kl_rows(z: mx.array, targets: mx.array, zt: mx.array, t: mx.array):
    """(CE per row, KL(pt ‖ ps) per row at temperature t), without the T² factor."""
    rows, trows = _rows(z), _rows(zt)
    kl = _kl_parts(rows, trows, float(t.item()))[3]
    return (mx.array(_ce_rows(rows, _targets(targets)).reshape(targets.shape)),
            mx.array(kl.reshape(targets.shape)))


@ce_kl_rows.vjp
def _ce_kl_rows_vjp(primals, cotangents, outputs):
    z, targets, zt, t = primals
    temp = float(t.item())
    rows, trows = _rows(z), _rows(zt)
    g = _ce_grad(rows, _targets(targets), cotangents[0])
    dkl = host(cotangents[1]).reshape(-1, 1)
    log_ps, pt, gap, kl = _kl_parts(rows, trows, temp)
    diff = np.exp(log_ps) - pt
    g += diff * (dkl / temp)
    # ∂KL/∂t per row, then weighted by the KL cotangents.
    gap -= kl[:, None]
    dkl_dt = -((diff * rows).sum(-1) + (pt * gap * trows).sum(-1)) / (temp * temp)
    dt = float((dkl[:, 0] * dkl_dt).sum())
    return (mx.array(g.reshape(z.shape)).astype(z.dtype), mx.zeros_like(targets),
            mx.zeros_like(zt), mx.array(dt, dtype=t.dtype))


def usable(*arrays: mx.array) -> bool:
    """The numpy path applies: Linux CPU, and the arrays can be read (not inside compile)."""
    if not enabled():
        return False
    try:
        for a in arrays:
            mx.eval(a)
    except TRANSFORM_ERRORS:
        return False
    return True
