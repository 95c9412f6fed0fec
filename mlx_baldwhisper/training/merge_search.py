"""Choosing the merge weights α and β, per merge group, by successive halving.

The merged weight (α·W_lower + β·W_upper)/(α+β) depends only on the ratio
r = α/(α+β), so a candidate is one r per merge group. Each trial merges the teacher
with its ratios, recovers briefly on a fraction of the training set and is scored by
WER on part of the dev set (the paper: 30 Bayesian-optimisation trials). Successive
halving spends the budget where it matters: every candidate trains a short budget,
the best 1/η are trained again (from the merge) with η times the steps, until the next
rung would hold one. The uniform ratios
(one r for every group) come first, then per-group combinations drawn from the seed.
``method="grid"`` is the older search: every uniform ratio once, at the first budget.

Every trial is logged with its steps and seconds, and an interrupted search reuses the
trials it finished under the same settings (teacher, data, recovery, groups).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..diskspace import replace_file
from ..folders import claim_run_folder
from ..merge import adjacent_pairs, parse_groups
from ..model import Whisper
from ..surgery import compress
from .common import StageData, dev_evaluator
from .distributed import is_main
from .recover import RecoverConfig, merging, recover
from .trainer import TrainConfig


@dataclass
class MergeSearchConfig:
    ratios: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)  # r = α/(α+β) per group
    method: str = "halving"  # "halving" | "grid" (every uniform ratio once)
    per_group: bool = True  # each merge group its own r; False: one r for all groups
    trials: int = 9  # first-rung candidates of successive halving
    eta: int = 3  # each rung keeps the best 1/eta, trained eta times longer
    train_fraction: float = 0.3
    dev_limit: Optional[int] = 60
    # The first rung's recovery; max_steps is the first rung's budget.
    recover: RecoverConfig = field(default_factory=lambda: RecoverConfig(
        train=TrainConfig(lr=1e-4, warmup_steps=5, max_steps=30, plot=False, progress=False)))

    def __post_init__(self):
        if self.method not in ("halving", "grid"):
            raise ValueError(f"search method must be 'halving' or 'grid', got {self.method!r}")
        if not self.ratios or any(not 0 <= r < 1 for r in self.ratios):
            raise ValueError(f"search ratios must lie in [0, 1), got {self.ratios}")
        if self.trials < 1 or self.eta < 2:
            raise ValueError(f"search needs trials >= 1 and eta >= 2, got {self.trials}, {self.eta}")
        if getattr(self.recover, "untuned_kl_weight", 0):
            raise ValueError("search.recover.untuned_kl_weight is not supported: the trials have no "
                             "untuned model; set it in recover only")


def merge_groups_of(n_layers: int, groups: Optional[str]) -> list[list[int]]:
    """The merge groups as merge.py takes them (a single-layer group is kept as it is)."""
    return parse_groups(groups) if groups else adjacent_pairs(n_layers)


def searched(groups: Sequence[Sequence[int]]) -> int:
    """How many groups get a ratio: those that combine layers."""
    return sum(len(g) > 1 for g in groups)


def weights_spec(groups: Sequence[Sequence[int]], ratios: Sequence[float]) -> str:
    """Per-group ratios as ``Surgery.merge_weights``: r for each lower layer, 1 − r for the
    top one; a single-layer group keeps weight 1."""
    it = iter(ratios)
    parts = []
    for g in groups:
        r = next(it) if len(g) > 1 else None
        parts.append("1" if r is None else ",".join([f"{r:g}"] * (len(g) - 1) + [f"{1 - r:g}"]))
    return ";".join(parts)


def merge_choice(groups: Sequence[Sequence[int]], ratios: Sequence[float]) -> dict:
    """What the merged stage needs: α, β when one r serves all groups, else per-group weights."""
    if len(set(ratios)) == 1:
        return {"alpha": ratios[0], "beta": 1.0 - ratios[0], "merge_weights": None}
    return {"alpha": None, "beta": None, "merge_weights": weights_spec(groups, ratios)}


def candidates(cfg: MergeSearchConfig, n_groups: int, seed: int) -> list[tuple[float, ...]]:
    """Uniform ratios first, then distinct per-group combinations drawn from ``seed``."""
    uniform = [(r,) * n_groups for r in cfg.ratios]
    if cfg.method == "grid" or not cfg.per_group or n_groups < 2:
        return uniform if cfg.method == "grid" else uniform[:cfg.trials]
    wanted = cfg.trials - len(uniform)
    mixed_count = len(cfg.ratios) ** n_groups - len(cfg.ratios)
    rng = np.random.default_rng([int(seed), 17])
    if wanted <= 0:
        return uniform[:cfg.trials]
    if wanted >= mixed_count:  # every combination (few: small models)
        mixed = [c for c in itertools.product(cfg.ratios, repeat=n_groups) if len(set(c)) > 1]
        return uniform + [mixed[i] for i in rng.permutation(len(mixed))]
    drawn: list[tuple[float, ...]] = []  # drawn, never enumerated: 6^12 pairs for a 24-layer decoder
    while len(drawn) < wanted:
        c = tuple(float(x) for x in rng.choice(cfg.ratios, size=n_groups))
        if len(set(c)) > 1 and c not in drawn:
            drawn.append(c)
    return uniform + drawn


def merge_search(teacher: Whisper, data: StageData, cfg: MergeSearchConfig, out: Path,
                 groups: Optional[str] = None, resume: bool = True) -> dict:
    """Returns the winner's {"alpha", "beta", "merge_weights", "ratios"}, every trial and
    the search's cost. Trials go to ``out/trials.jsonl``, replaced whole after each one (a
    full disk: DiskFullError naming it, the earlier list kept)."""
    if is_main():
        claim_run_folder(out)
    score = dev_evaluator(data, cfg.dev_limit)
    merged = merge_groups_of(teacher.dims.n_text_layer, groups)
    settings = _settings_key(teacher, data, cfg, groups)
    done = [t for t in _finished_trials(out / "trials.jsonl") if t.get("settings") == settings] if resume else []
    trials: list[dict] = []

    def trial(ratios: tuple[float, ...], steps: int) -> dict:
        key = (list(ratios), steps)
        if key in [(t["ratios"], t["steps"]) for t in done]:
            return next(t for t in done if (t["ratios"], t["steps"]) == key)
        start = time.perf_counter()
        choice = merge_choice(merged, ratios)
        student = compress(teacher, merging(choice, groups))
        rec = replace(cfg.recover, eval_limit=cfg.dev_limit,
                      train=replace(cfg.recover.train, max_steps=steps))
        name = "-".join(f"{r:g}" for r in ratios)
        recover(student, teacher, data, rec, out / f"trial-r{name}-s{steps}", stage="merge-search",
                fraction=cfg.train_fraction, evaluate=False)
        return {"ratios": list(ratios), "steps": steps, **choice, **score(student),
                "seconds": round(time.perf_counter() - start, 1), "settings": settings}

    pool, steps = candidates(cfg, searched(merged), cfg.recover.train.seed), cfg.recover.train.max_steps
    while True:
        rung = []
        for ratios in pool:
            rung.append(trial(ratios, steps))
            trials.append(rung[-1])
            if is_main():  # rewritten after each trial, so an interrupted search keeps what it did
                replace_file(out / "trials.jsonl", "".join(json.dumps(t) + "\n" for t in trials))
        rung.sort(key=lambda t: (t["wer"], t["cer"]))
        keep = math.ceil(len(rung) / cfg.eta)
        if cfg.method == "grid" or keep == 1:  # a lone survivor needs no longer trial
            best = rung[0]
            break
        pool, steps = [tuple(t["ratios"]) for t in rung[:keep]], steps * cfg.eta
    return {"alpha": best["alpha"], "beta": best["beta"], "merge_weights": best["merge_weights"],
            "ratios": best["ratios"], "method": cfg.method, "trials": trials,
            "trial_steps": sum(t["steps"] for t in trials),
            "trial_seconds": round(sum(t["seconds"] for t in trials), 1)}


def _settings_key(teacher: Whisper, data: Optional[StageData], cfg: MergeSearchConfig,
                  groups: Optional[str]) -> str:
    """What a trial's score depends on besides its ratios and steps: a finished trial is
    reused only under the same teacher weights, data, recovery settings and groups."""
    from .seqkd import weights_fingerprint

    recover = asdict(cfg.recover)
    recover["train"].pop("max_steps")
    parts = {"teacher": weights_fingerprint(teacher) if hasattr(teacher, "parameters") else repr(teacher),
             "train": [it.name for it in data.train] if data is not None else None,
             "dev": [it.name for it in data.dev[:cfg.dev_limit]] if data is not None else None,
             "recover": recover, "train_fraction": cfg.train_fraction, "groups": groups}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _finished_trials(path: Path) -> list[dict]:
    """Trials an interrupted search already scored (ones from an older format are redone)."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict) and {"ratios", "steps", "wer", "cer"} <= set(r)]
