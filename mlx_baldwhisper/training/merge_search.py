"""Choosing α and β for layer merging.

The merged weight (α·W_lower + β·W_upper)/(α+β) depends only on the ratio
r = α/(α+β), so the search is one-dimensional: each trial merges the teacher with
α = r, β = 1 − r, recovers briefly on a fraction of the training set, and is scored
by WER on part of the dev set (the paper: 30 Bayesian-optimisation trials on 30% of
train / 60% of dev). A 1-D grid over r is a sound replacement for Bayesian
optimisation at this size: it is exhaustive at the chosen resolution, and the grid
leans towards small r, where the paper found the optimum. Every trial is logged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from ..diskspace import replace_file
from ..folders import claim_run_folder
from ..surgery import Surgery, compress
from ..model import Whisper
from .common import StageData, dev_evaluator
from .distributed import is_main
from .recover import RecoverConfig, recover
from .trainer import TrainConfig


@dataclass
class MergeSearchConfig:
    ratios: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5)  # r = α/(α+β)
    train_fraction: float = 0.3
    dev_limit: Optional[int] = 60
    recover: RecoverConfig = field(default_factory=lambda: RecoverConfig(
        train=TrainConfig(lr=1e-4, warmup_steps=5, max_steps=30, plot=False, progress=False)))


def merge_search(teacher: Whisper, data: StageData, cfg: MergeSearchConfig, out: Path,
                 groups: Optional[str] = None) -> dict:
    """Returns {"alpha", "beta", "trials"}; trials go to ``out/trials.jsonl``, replaced
    whole after each one (a full disk: DiskFullError naming it, the earlier list kept)."""
    if is_main():
        claim_run_folder(out)
    score = dev_evaluator(data, cfg.dev_limit)
    trials = []
    for r in cfg.ratios:
        start = time.perf_counter()
        student = compress(teacher, Surgery(merge=True, merge_groups=groups, alpha=r, beta=1.0 - r))
        rec = replace(cfg.recover, eval_limit=cfg.dev_limit)
        recover(student, teacher, data, rec, out / f"trial-r{r:g}", stage="merge-search",
                fraction=cfg.train_fraction, evaluate=False)
        trials.append({"ratio": r, "alpha": r, "beta": 1.0 - r, **score(student),
                       "seconds": round(time.perf_counter() - start, 1)})
        if is_main():  # rewritten after each trial, so an interrupted search keeps what it did
            replace_file(out / "trials.jsonl", "".join(json.dumps(t) + "\n" for t in trials))
    best = min(trials, key=lambda t: (t["wer"], t["cer"]))
    return {"alpha": best["alpha"], "beta": best["beta"], "trials": trials}
