"""The α/β search: per-group candidates, successive halving, resuming, and what it costs.
The trials themselves are stubbed (a score from the ratios) so the schedule is under test."""

import json
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_model
from mlx_baldwhisper.surgery import compress
from mlx_baldwhisper.training import merge_search as search_module
from mlx_baldwhisper.training.merge_search import (MergeSearchConfig, candidates, merge_choice,
                                                   merge_groups_of, merge_search, weights_spec)
from mlx_baldwhisper.training.recover import merging

BEST = (0.1, 0.3)  # the stub's optimum, per group


@pytest.fixture
def stubbed(monkeypatch):
    """Trials scored by distance to BEST, shrinking with the steps; counts recoveries."""
    calls = []
    monkeypatch.setattr(search_module, "compress", lambda teacher, surgery: SimpleNamespace(surgery=surgery))

    def fake_recover(student, teacher, data, cfg, out, **kw):
        calls.append(cfg.train.max_steps)
        student.steps = cfg.train.max_steps

    def score(student):
        w = [[float(x) for x in g.split(",")] for g in student.surgery.merge_weights.split(";")] \
            if student.surgery.merge_weights else [[student.surgery.alpha, student.surgery.beta]] * 2
        ratios = [g[0] / (g[0] + g[-1]) for g in w if len(g) > 1]
        return {"wer": sum(abs(r - b) for r, b in zip(ratios, BEST)) + 1 / student.steps, "cer": 0.0}

    monkeypatch.setattr(search_module, "recover", fake_recover)
    monkeypatch.setattr(search_module, "dev_evaluator", lambda data, limit: score)
    return calls


TEACHER = SimpleNamespace(dims=SimpleNamespace(n_text_layer=6))
GROUPS = "0;1,2,3;4,5"


def test_candidates_are_uniform_first_then_distinct_per_group_draws():
    cfg = MergeSearchConfig(ratios=(0.0, 0.1, 0.3), trials=7)
    first = candidates(cfg, 2, seed=0)
    assert first[:3] == [(0.0, 0.0), (0.1, 0.1), (0.3, 0.3)]
    assert len(first) == 7 == len(set(first)) and all(len(set(c)) == 2 for c in first[3:])
    assert candidates(cfg, 2, seed=0) == first and candidates(cfg, 2, seed=1) != first
    assert candidates(MergeSearchConfig(ratios=(0.0, 0.1), method="grid"), 2, 0) == [(0.0, 0.0), (0.1, 0.1)]


def test_weights_spec_and_choice():
    groups = merge_groups_of(6, GROUPS)
    assert groups == [[0], [1, 2, 3], [4, 5]]
    assert weights_spec(groups, (0.1, 0.25)) == "1;0.1,0.1,0.9;0.25,0.75"
    assert merge_choice(groups, (0.2, 0.2)) == {"alpha": 0.2, "beta": 0.8, "merge_weights": None}
    assert merge_choice(groups, (0.1, 0.25))["merge_weights"] == "1;0.1,0.1,0.9;0.25,0.75"


def test_per_group_weights_merge_as_written():
    """Group (1,2,3) with r=0.1 and group (4,5) with r=0.25: each merged layer is the
    weighted mean of its group's layers, weights r, r, 1 − r (checked on one matrix)."""
    teacher = tiny_model(n_text_layer=6)
    choice = merge_choice(merge_groups_of(6, GROUPS), (0.1, 0.25))
    student = compress(teacher, merging(choice, GROUPS))
    assert len(student.decoder.blocks) == 3
    w = [np.array(b.mlp1.weight) for b in teacher.decoder.blocks]
    got = [np.array(b.mlp1.weight) for b in student.decoder.blocks]
    np.testing.assert_allclose(got[0], w[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], (0.1 * w[1] + 0.1 * w[2] + 0.9 * w[3]) / 1.1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2], 0.25 * w[4] + 0.75 * w[5], rtol=1e-5, atol=1e-6)


def test_successive_halving_schedule_winner_and_cost(tmp_path, stubbed):
    cfg = MergeSearchConfig(ratios=(0.0, 0.1, 0.3, 0.5), trials=16, eta=3)  # all 4 x 4 pairs
    cfg.recover.train.max_steps = 10
    found = merge_search(TEACHER, None, cfg, tmp_path / "s", GROUPS)
    assert stubbed == [10] * 16 + [30] * 6 + [90] * 2  # the best third goes on at 3x the steps
    assert found["ratios"] == list(BEST) and found["merge_weights"] == "1;0.1,0.1,0.9;0.3,0.7"
    assert found["trial_steps"] == 16 * 10 + 6 * 30 + 2 * 90 and len(found["trials"]) == 24
    logged = [json.loads(x) for x in (tmp_path / "s" / "trials.jsonl").read_text().splitlines()]
    assert [t["steps"] for t in logged] == stubbed and all("seconds" in t for t in logged)
    # an interrupted (here: finished) search rerun reuses its trials instead of training again
    assert merge_search(TEACHER, None, cfg, tmp_path / "s", GROUPS)["ratios"] == list(BEST)
    assert len(stubbed) == 24


def test_uniform_only_search_returns_alpha_beta(tmp_path, stubbed):
    cfg = MergeSearchConfig(ratios=(0.0, 0.1, 0.5), per_group=False)
    found = merge_search(TEACHER, None, cfg, tmp_path / "u", GROUPS)
    assert found["merge_weights"] is None and (found["alpha"], found["beta"]) == (0.1, 0.9)


def test_bad_search_settings_are_refused():
    with pytest.raises(ValueError, match="method"):
        MergeSearchConfig(method="bayes")
    with pytest.raises(ValueError, match="ratios"):
        MergeSearchConfig(ratios=(0.1, 1.0))


def test_many_groups_are_drawn_not_enumerated():
    """A 24-layer decoder has 12 pairs: 6^12 combinations are never listed."""
    cfg = MergeSearchConfig(trials=20)
    got = candidates(cfg, 12, seed=3)
    assert len(got) == 20 == len(set(got)) and got[:6] == [(r,) * 12 for r in cfg.ratios]


def test_trials_are_reused_only_under_the_same_settings(tmp_path, stubbed):
    cfg = MergeSearchConfig(ratios=(0.0, 0.1, 0.5), per_group=False)
    merge_search(TEACHER, None, cfg, tmp_path / "k", GROUPS)
    assert len(stubbed) == 3
    merge_search(TEACHER, None, cfg, tmp_path / "k", GROUPS)
    assert len(stubbed) == 3  # same settings: reused
    merge_search(TEACHER, None, cfg, tmp_path / "k", GROUPS, resume=False)
    assert len(stubbed) == 6  # --no-resume: trained again
    cfg.train_fraction = 0.5
    merge_search(TEACHER, None, cfg, tmp_path / "k", GROUPS)
    assert len(stubbed) == 9  # other recovery data: trained again


def test_the_search_refuses_the_untuned_term():
    from mlx_baldwhisper.training.recover import RecoverConfig

    with pytest.raises(ValueError, match="untuned_kl_weight is not supported"):
        MergeSearchConfig(recover=RecoverConfig(untuned_kl_weight=0.1))
