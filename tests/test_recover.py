"""Intermediate-layer distillation in recovery and in the shear stage: which teacher layer
each student layer matches, the loss against hand-computed terms, and that training lowers it."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from conftest import tiny_model
from mlx_baldwhisper.surgery import Surgery, compress
from mlx_baldwhisper.training.losses import LearnableTemperature, distillation_loss, kl_distillation
from mlx_baldwhisper.training.recover import distill_loss_fn, teacher_layers
from mlx_baldwhisper.training.shear import ShearConfig, shear_loss_fn


def test_each_student_layer_stands_for_the_last_layer_of_its_group():
    teacher = tiny_model(n_text_layer=6)
    merged = compress(teacher, Surgery(merge=True, merge_groups="0;1,2,3;4,5"))
    assert teacher_layers(merged) == [0, 3, 5]
    removed = compress(teacher, Surgery(drop=3))
    kept = teacher_layers(removed)
    assert len(kept) == 3 and kept == sorted(kept) and kept[0] == 0 and kept[-1] == 5
    assert teacher_layers(teacher) == list(range(6))


def _batch(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50000, size=(2, 7)).astype(np.int32)
    mask = np.ones((2, 6), np.float32)
    mask[1, 4:] = 0.0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask,
            "features": rng.standard_normal((2, 1500, 32)).astype(np.float32)}


def test_hidden_term_is_the_mse_to_the_mapped_teacher_layers():
    teacher = tiny_model(n_text_layer=4)
    student = compress(teacher, Surgery(merge=True, merge_groups="0,1;2,3"))
    batch = _batch()
    loss, parts = distill_loss_fn(teacher, LearnableTemperature(2.0), 1.0, 1.0, 0.5,
                                  teacher_layers(student))(student, batch)
    inputs, feats = mx.array(batch["inputs"]), mx.array(batch["features"])
    t_states, t_logits = teacher.decoder.layer_states(inputs, feats)
    s_states, s_logits = student.decoder.layer_states(inputs, feats)
    m = batch["mask"]
    by_hand = np.mean([((np.array(s) - np.array(t_states[i])) ** 2).mean(-1)[m > 0].mean()
                       for s, i in zip(s_states, [1, 3])])
    assert parts["hidden"].item() == pytest.approx(by_hand, rel=1e-4)
    base, _ = distillation_loss(s_logits, t_logits, mx.array(batch["targets"]), mx.array(m), 2.0)
    assert loss.item() == pytest.approx(base.item() + 0.5 * by_hand, rel=1e-4)


def test_shear_hidden_term_adds_the_mse_to_the_mapped_teacher_layers():
    """shear.hidden_weight w adds w·MSE(student layer k, teacher layer of its group) to the
    shear loss, and leaves its other parts as they were; the sheared student still knows
    which teacher layers its merged layers stand for."""
    teacher = tiny_model(n_text_layer=4)
    student = compress(compress(teacher, Surgery(merge=True, merge_groups="0,1;2,3")), Surgery(rank=8))
    assert teacher_layers(student) == [1, 3]
    batch, temperature = _batch(), LearnableTemperature(2.0)
    plain_loss, plain = shear_loss_fn(teacher, temperature, ShearConfig(rank=8, hidden_weight=0.0))(student, batch)
    loss, parts = shear_loss_fn(teacher, temperature, ShearConfig(rank=8, hidden_weight=0.5),
                                teacher_layers(student))(student, batch)
    inputs, feats, m = mx.array(batch["inputs"]), mx.array(batch["features"]), batch["mask"]
    t_states = teacher.decoder.block_states(inputs, feats)
    by_hand = np.mean([((np.array(s) - np.array(t_states[i])) ** 2).mean(-1)[m > 0].mean()
                       for s, i in zip(student.decoder.block_states(inputs, feats), [1, 3])])
    assert parts["hidden"].item() == pytest.approx(by_hand, rel=1e-4) and by_hand > 0
    for part in ("ce", "kl", "feat_in", "feat_out"):
        assert parts[part].item() == pytest.approx(plain[part].item(), rel=1e-4), part
    assert loss.item() == pytest.approx(plain_loss.item() + 0.5 * by_hand, rel=1e-4)


def test_training_on_the_hidden_term_lowers_it():
    teacher = tiny_model(n_text_layer=4)
    student = compress(teacher, Surgery(merge=True, merge_groups="0,1;2,3"))
    fn = distill_loss_fn(teacher, LearnableTemperature(2.0), 0.0, 0.0, 1.0, teacher_layers(student))
    batch = _batch()
    opt = optim.Adam(learning_rate=1e-3)
    first = fn(student, batch)[1]["hidden"].item()
    grad_fn = nn.value_and_grad(student, lambda m: fn(m, batch)[0])
    for _ in range(30):
        _, grads = grad_fn(student)
        opt.update(student, grads)
        mx.eval(student.parameters(), opt.state)
    assert fn(student, batch)[1]["hidden"].item() < 0.5 * first


def test_untuned_term_is_the_kl_to_the_untuned_model():
    """recover.untuned_kl_weight w adds w·T²·KL(untuned_T ‖ student_T) to the loss."""
    untuned = tiny_model(seed=1, n_text_layer=4)
    teacher = tiny_model(seed=2, n_text_layer=4)
    student = compress(teacher, Surgery(merge=True, merge_groups="0,1;2,3"))
    batch, temperature = _batch(), LearnableTemperature(2.0)
    plain, _ = distill_loss_fn(teacher, temperature, 1.0, 1.0)(student, batch)
    loss, parts = distill_loss_fn(teacher, temperature, 1.0, 1.0, untuned=untuned,
                                  untuned_kl_weight=0.3)(student, batch)
    inputs, feats, m = mx.array(batch["inputs"]), mx.array(batch["features"]), mx.array(batch["mask"])
    logits = [model.decoder.layer_states(inputs, feats)[1] for model in (student, untuned)]
    by_hand = kl_distillation(*logits, m, 2.0).item()
    assert parts["untuned_kl"].item() == pytest.approx(by_hand, rel=1e-4) and by_hand > 0
    assert loss.item() == pytest.approx(plain.item() + 0.3 * by_hand, rel=1e-4)
    with pytest.raises(ValueError, match="needs the untuned model"):
        distill_loss_fn(teacher, temperature, 1.0, 1.0, untuned_kl_weight=0.3)
