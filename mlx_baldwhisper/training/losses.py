"""Training losses for fine-tuning, recovery distillation (stage 1) and shearing (stage 2).

All reductions are masked means over the real (non-padding) tokens, computed in
float32 whatever the model dtype, so half-precision logits do not lose the small
probabilities that the KL and CE terms depend on.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..backends.cpu import losses as fast_losses


def masked_mean(values: mx.array, mask: mx.array) -> mx.array:
    """Mean of ``values`` (B, T) over positions where ``mask`` is non-zero (0 if none)."""
    m = mask.astype(mx.float32)
    return (values * m).sum() / mx.maximum(m.sum(), 1.0)


def _ce_rows_mlx(logits: mx.array, targets: mx.array) -> mx.array:
    logp = nn.log_softmax(logits.astype(mx.float32), axis=-1)
    return -mx.take_along_axis(logp, targets.astype(mx.int32)[..., None], axis=-1)[..., 0]


def _kl_rows_mlx(student_logits: mx.array, teacher_logits: mx.array, t: mx.array) -> mx.array:
    log_pt = nn.log_softmax(mx.stop_gradient(teacher_logits.astype(mx.float32)) / t, axis=-1)
    log_ps = nn.log_softmax(student_logits.astype(mx.float32) / t, axis=-1)
    return (mx.exp(log_pt) * (log_pt - log_ps)).sum(axis=-1)


def _as_temperature(temperature: mx.array | float) -> mx.array:
    if isinstance(temperature, mx.array):
        return temperature.astype(mx.float32)
    return mx.array(temperature, dtype=mx.float32)


def token_losses(logits: mx.array, targets: mx.array, teacher_logits: Optional[mx.array] = None,
                 temperature: mx.array | float = 1.0) -> tuple[mx.array, Optional[mx.array]]:
    """Per-token (CE, KL(teacher_T ‖ student_T) or None), shapes (B, T).

    On Linux CPU both come from one numpy pass (``fast_losses``); elsewhere from MLX ops.
    """
    t = _as_temperature(temperature)
    fast = fast_losses.usable(logits, targets, t) and (
        teacher_logits is None or fast_losses.usable(teacher_logits))
    if teacher_logits is None:
        return (fast_losses.ce_rows(logits, targets) if fast else _ce_rows_mlx(logits, targets)), None
    if fast:
        teacher = mx.stop_gradient(teacher_logits.astype(mx.float32))
        return fast_losses.ce_kl_rows(logits, targets, teacher, t)
    return _ce_rows_mlx(logits, targets), _kl_rows_mlx(logits, teacher_logits, t)


def kl_term(kl_rows: mx.array, mask: mx.array, t: mx.array) -> mx.array:
    """T² · (masked mean of per-token KL): the T² keeps the gradient scale independent of T."""
    return masked_mean(kl_rows, mask) * (t * t)


def cross_entropy(logits: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """Token-level CE, mean over masked tokens. logits (B, T, V), targets/mask (B, T)."""
    return masked_mean(token_losses(logits, targets)[0], mask)


class LearnableTemperature(nn.Module):
    """Distillation temperature T = exp(log_temperature), clipped to [min_value, max_value].

    The log parametrisation keeps T positive. T is an ordinary trainable
    parameter: pass this module to the Trainer as an extra module so that it is
    optimised jointly with the student. The clip exists because the student can
    always lower T²·KL by moving T (both distributions flatten as T grows), so an
    unbounded T can drift to a degenerate value; inside the bounds it settles
    where the teacher's soft targets are most informative for the student.
    """

    def __init__(self, init: float = 2.0, min_value: float = 0.5, max_value: float = 10.0):
        super().__init__()
        if not 0 < min_value <= init <= max_value:
            raise ValueError(f"need 0 < min_value <= init <= max_value, got "
                             f"{min_value}, {init}, {max_value}")
        self.log_temperature = mx.array(math.log(init), dtype=mx.float32)
        self.min_value = min_value
        self.max_value = max_value

    def __call__(self) -> mx.array:
        return mx.clip(mx.exp(self.log_temperature), self.min_value, self.max_value)


def kl_distillation(
    student_logits: mx.array,
    teacher_logits: mx.array,
    mask: mx.array,
    temperature: mx.array | float,
) -> mx.array:
    """T² · KL(p_teacher,T ‖ p_student,T) per token, mean over masked tokens.

    Direction: PAPER.md writes "KL(student ‖ teacher logits)", which we read as
    naming the two arguments rather than the order of the divergence. We use the
    standard (Hinton) forward KL Σ p_t (log p_t − log p_s): it is the CE against
    the teacher's soft labels minus a constant, so it makes the student cover all
    of the teacher's probability mass (mode-covering), which suits recovery of a
    merged or sheared copy of that same teacher. The T² factor keeps the gradient
    scale independent of T. No gradient flows into the teacher logits; it does
    flow into ``temperature`` when that is a traced parameter.
    """
    t = _as_temperature(temperature)
    kl = token_losses(student_logits, mx.zeros(student_logits.shape[:-1], mx.int32),
                      teacher_logits, t)[1]
    return kl_term(kl, mask, t)


def cosine_similarity(a: mx.array, b: mx.array, eps: float = 1e-8) -> mx.array:
    """Row-wise cosine similarity along the last axis."""
    a = a.astype(mx.float32)
    b = b.astype(mx.float32)
    num = (a * b).sum(axis=-1)
    den = mx.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    return num / mx.maximum(den, eps)


def feature_distance(a: mx.array, b: mx.array) -> mx.array:
    """mean|a − b| − mean log σ(cos(a, b)): the stage-2 feature distance of PAPER.md.

    The L1 term matches magnitudes, the cosine term directions. Its minimum
    (a == b) is −log σ(1) ≈ 0.313, not 0.
    """
    a32 = a.astype(mx.float32)
    b32 = b.astype(mx.float32)
    cos = cosine_similarity(a32, b32)
    log_sig = -mx.logaddexp(mx.array(0.0), -cos)  # log σ(x), stable
    return mx.abs(a32 - b32).mean() - log_sig.mean()


def hidden_state_mse(student: list[mx.array], teacher: list[mx.array], mask: mx.array) -> mx.array:
    """Mean over layers of the masked mean (over tokens) of the squared distance per
    hidden unit: how far each decoder layer's states are from the teacher's."""
    if len(student) != len(teacher):
        raise ValueError(f"the student has {len(student)} decoder layers and the teacher "
                         f"{len(teacher)}: hidden states cannot be matched layer by layer")
    per_layer = [masked_mean(mx.square(s.astype(mx.float32) - t.astype(mx.float32)).mean(axis=-1), mask)
                 for s, t in zip(student, teacher)]
    return mx.stack(per_layer).mean()


def distillation_loss(
    student_logits: mx.array,
    teacher_logits: mx.array,
    targets: mx.array,
    mask: mx.array,
    temperature: mx.array | float,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
) -> tuple[mx.array, dict[str, mx.array]]:
    """λ·CE(labels) + γ·T²·KL(teacher ‖ student); returns (loss, parts to log)."""
    t = _as_temperature(temperature)
    ce_rows, kl_rows = token_losses(student_logits, targets, teacher_logits, t)
    ce, kl = masked_mean(ce_rows, mask), kl_term(kl_rows, mask, t)
    loss = ce_weight * ce + kl_weight * kl
    return loss, {"ce": ce, "kl": kl, "temperature": mx.stop_gradient(t)}
