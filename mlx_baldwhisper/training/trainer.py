"""One training loop for every stage (fine-tune, recover, shear).

Stages differ only in the model, the loss function, which parameters train and
how they are evaluated, so those are arguments and the loop is shared: AdamW with
warm-up + decay, global-norm clipping, gradient accumulation, periodic evaluation
with best-model saving and early stopping, atomic checkpoints that resume
bit-identically, clean Ctrl-C handling and a hard stop on a non-finite loss.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .. import locks
from ..diskspace import DiskFullError, append_file, replace_file
from ..folders import claim_run_folder
from . import distributed
from .distributed import shard
from .common import write_json
from .checkpoint import (CKPT_DIR, capture_rng_state, latest_checkpoint, load_checkpoint,
                         read_checkpoint_state, resumable_checkpoint, save_checkpoint)

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], tuple[mx.array, dict[str, mx.array]]]
TrainableFilter = Union[Callable[[str], bool], Sequence[str]]


# Settings that may change between a run and its resume: they say how long to train and
# what to log or keep, not what an optimizer step computes.
SAFE_CHANGES = frozenset({"max_steps", "eval_every", "save_every", "log_every", "keep_checkpoints",
                          "progress", "plot", "patience"})


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"settings": {"batch_size": 8}} -> {"batch_size": 8}: names as a user writes them."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}." if k != "settings" else prefix))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resumable(folder: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Refuse to mix settings across a resume, naming what differs; the few that are safe
    to change (SAFE_CHANGES, matched by their last name part) are applied with a warning."""
    old_flat, new_flat = _flatten(old), _flatten(new)
    changed = {k: (old_flat[k], v) for k, v in new_flat.items() if k in old_flat and old_flat[k] != v}
    unsafe = {k: d for k, d in changed.items() if k.rsplit(".", 1)[-1] not in SAFE_CHANGES}
    if unsafe:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in unsafe.items())
        raise ValueError(f"{folder} holds a run started with other settings ({listed}). "
                         f"Rerun with the original settings to resume it, pass --no-resume to "
                         f"start it over, or choose another --out")
    for k, (a, b) in changed.items():
        log.warning("resuming with %s changed from %r to %r", k, a, b)


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the bad update was not applied."""


class BatchSource(Protocol):
    """What the trainer needs from a batcher (e.g. training.data.Batcher).

    ``state_dict()`` must be JSON-able and describe the position *after* the last
    batch yielded; ``iter()`` is called again when an epoch ends.
    """

    def __iter__(self) -> Iterator[Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainConfig:
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_steps: int = 1000  # optimizer steps (each = grad_accum micro-batches)
    schedule: str = "linear"  # decay after warm-up: "linear" | "cosine" | "constant"
    final_lr_ratio: float = 0.0  # lr at max_steps, as a fraction of lr
    grad_clip: Optional[float] = 1.0  # global norm; None = no clipping
    grad_accum: int = 1
    eval_every: int = 0  # 0 = only at the end (if an evaluate_fn is given)
    save_every: int = 0  # 0 = only at the end / on interrupt
    keep_checkpoints: int = 3
    seed: int = 0
    log_every: int = 10
    patience: Optional[int] = None  # evaluations without improvement before stopping
    compile: bool = False  # mx.compile the forward/backward and the update
    progress: bool = True  # tqdm bar
    plot: bool = True  # write metrics.png at the end (needs matplotlib)

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule must be linear, cosine or constant, not {self.schedule!r}")
        if self.grad_accum < 1 or self.max_steps < 1 or self.warmup_steps < 0:
            raise ValueError("need grad_accum >= 1, max_steps >= 1, warmup_steps >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig settings: {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass
class TrainResult:
    status: str  # "completed" | "early_stopped" | "interrupted"
    step: int
    best_metric: Optional[float]
    checkpoint: Optional[Path]
    loss: Optional[float]  # mean training loss of the last logging window


def build_schedule(cfg: TrainConfig) -> Callable[[mx.array], mx.array]:
    """Linear warm-up to ``lr`` (first update already uses lr/warmup), then decay."""
    lr, w = cfg.lr, cfg.warmup_steps
    end = lr * cfg.final_lr_ratio
    n = max(cfg.max_steps - w, 1)
    if cfg.schedule == "cosine":
        decay = optim.cosine_decay(lr, n, end)
    elif cfg.schedule == "linear":
        decay = optim.linear_schedule(lr, end, n)
    else:
        decay = lambda step: mx.array(lr, dtype=mx.float32)  # noqa: E731
    if w == 0:
        return decay
    warm = optim.linear_schedule(lr / w, lr, w - 1) if w > 1 else (lambda s: mx.array(lr))
    return optim.join_schedules([warm, decay], [w])


def apply_trainable_filter(model: nn.Module, keep: TrainableFilter) -> list[str]:
    """Freeze everything, then unfreeze parameters whose dotted name passes ``keep``
    (a predicate, or a list of name prefixes such as ``["decoder."]``)."""
    if not callable(keep):
        prefixes = tuple(keep)
        keep = lambda name: name.startswith(prefixes)  # noqa: E731
    modules = dict(model.named_modules())
    chosen = [n for n, _ in tree_flatten(model.parameters()) if keep(n)]
    if not chosen:
        raise ValueError("trainable_filter matches no parameter")
    model.freeze()
    for name in chosen:
        owner, _, key = name.rpartition(".")
        modules[owner].unfreeze(recurse=False, keys=[key])
    return chosen


def save_weights(model: nn.Module, path: Path) -> None:
    """Default best-model saver: ``path/weights.safetensors``, swapped in atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(tmp / "weights.safetensors"))
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


class _Bundle(nn.Module):
    """The model plus jointly trained extras (e.g. a temperature), as one tree."""

    def __init__(self, model: nn.Module, extra: dict[str, nn.Module]):
        super().__init__()
        self.model = model
        self.extra = extra


def _field(batch: Any, names: Sequence[str]) -> Any:
    for n in names:
        v = batch.get(n) if isinstance(batch, Mapping) else getattr(batch, n, None)
        if v is not None:
            return v
    return None


def count_batch(batch: Any) -> tuple[int, int]:
    """(items, tokens) of a batch, for throughput; best effort on dicts/objects/tuples."""
    mask = _field(batch, ("mask", "loss_mask", "target_mask"))
    toks = _field(batch, ("targets", "tokens", "inputs", "labels"))
    first = _field(batch, ("targets", "tokens", "inputs", "mel", "features", "audio_features"))
    if first is None and isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
    items = int(first.shape[0]) if getattr(first, "ndim", 0) else 0
    if mask is not None:
        tokens = int(np.asarray(mask, dtype=np.float32).sum())
    else:
        tokens = int(toks.size) if hasattr(toks, "size") else 0
    return items, tokens


class _Sigint:
    """First Ctrl-C asks the loop to stop after the current step; a second one
    raises KeyboardInterrupt at once. Only active in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._prev: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self) -> "_Sigint":
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)


class _Window:
    """Sums of losses, logged scalars and counts since the last log line."""

    def __init__(self) -> None:
        self.loss, self.n, self.items, self.tokens = 0.0, 0, 0, 0
        self.logs: dict[str, float] = {}
        self.t0 = time.monotonic()

    def add(self, loss: float, logs: Mapping[str, float], items: int, tokens: int) -> None:
        self.loss, self.n = self.loss + loss, self.n + 1
        self.items, self.tokens = self.items + items, self.tokens + tokens
        for k, v in logs.items():
            self.logs[k] = self.logs.get(k, 0.0) + v

    def merge(self, other: "_Window") -> None:
        """Add one optimizer step (the mean over its micro-batches, their total counts)."""
        self.add(other.loss / other.n, {k: v / other.n for k, v in other.logs.items()},
                 other.items, other.tokens)


class Trainer:
    """Trains ``model`` on ``loss_fn(model, batch) -> (loss, {name: scalar array})``.

    trainable_filter: parameter-name predicate or prefixes (e.g. ``["decoder."]``);
        everything else is frozen. None keeps the model's own freeze state.
    extra_modules: modules optimised jointly with the model and checkpointed with it
        (e.g. ``{"temperature": LearnableTemperature()}`` used inside ``loss_fn``).
    evaluate_fn(model) -> {metric: value}: run every ``eval_every`` steps and at the
        end; the best model by ``metric`` goes to ``save_best(model, out_dir/"best")``.
    count_fn(batch) -> (items, tokens): for the throughput figures.
    settings: what else defines the run (the stage's config, the data); saved in every
        checkpoint, and a resume with different settings is refused (see SAFE_CHANGES).
    With ``config.compile``, batches must be trees of arrays.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        config: TrainConfig,
        out_dir: str | os.PathLike,
        trainable_filter: Optional[TrainableFilter] = None,
        extra_modules: Optional[Mapping[str, nn.Module]] = None,
        evaluate_fn: Optional[Callable[[nn.Module], Mapping[str, float]]] = None,
        metric: str = "wer",
        lower_is_better: bool = True,
        save_best: Optional[Callable[[nn.Module, Path], None]] = None,
        count_fn: Callable[[Any], tuple[int, int]] = count_batch,
        settings: Optional[Mapping[str, Any]] = None,
    ):
        self.model, self.loss_fn, self.config = model, loss_fn, config
        self.out_dir = Path(out_dir)
        self.extra_modules = dict(extra_modules or {})
        self.evaluate_fn, self.metric, self.lower_is_better = evaluate_fn, metric, lower_is_better
        self.save_best = save_best or save_weights
        self.count_fn = count_fn
        self.rank, self.size = distributed.rank(), distributed.size()
        self.settings = dict(settings or {})
        if trainable_filter is not None:
            apply_trainable_filter(model, trainable_filter)
        self.bundle = _Bundle(model, self.extra_modules)
        self.optimizer = optim.AdamW(learning_rate=build_schedule(config),
                                     weight_decay=config.weight_decay)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self._reset_counters()

    # -- state ------------------------------------------------------------------

    def _reset_counters(self) -> None:
        self.step = 0
        self.best: Optional[float] = None
        self.bad_evals = 0
        self.last_eval_step = -1
        self.elapsed_before = 0.0

    def _counters(self) -> dict[str, Any]:
        return {"step": self.step, "best": self.best, "bad_evals": self.bad_evals,
                "last_eval_step": self.last_eval_step, "elapsed": self._elapsed()}

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self._t0)

    def _save(self, data_state: dict[str, Any], rng: dict[str, Any]) -> Path:
        lr = float(self.optimizer.state.get("learning_rate", mx.array(self.config.lr)).item())
        extra = {"trainer": self._counters(), "data": data_state,
                 "schedule": {"optimizer_step": self.step, "lr": lr}}
        self._saved_step = self.step
        if not distributed.is_main():  # every rank holds the same state; one writes it
            return self.out_dir / CKPT_DIR
        return save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, extra,
                               extra_modules=self.extra_modules, config=self._run_config(),
                               rng_state=rng, keep=self.config.keep_checkpoints)

    def _run_config(self) -> dict[str, Any]:
        """TrainConfig keys flat (as older checkpoints have them) plus ``settings``; JSON form."""
        return json.loads(json.dumps({**self.config.to_dict(), "settings": self.settings}, default=str))

    def _check_settings(self, old: Mapping[str, Any]) -> None:
        check_resumable(self.out_dir, old, self._run_config())

    def _resume(self, batches: BatchSource) -> bool:
        found = resumable_checkpoint(self.out_dir)
        state = read_checkpoint_state(found) if found else {}
        distributed.same_everywhere(state.get("step", -1), f"the last checkpoint in {self.out_dir}")
        if found is None:
            log.info("no checkpoint in %s: starting from scratch", self.out_dir)
            return False
        self._check_settings(state.get("config", {}))
        extra = load_checkpoint(found, self.model, self.optimizer, extra_modules=self.extra_modules)
        t = extra["trainer"]
        self.step, self.best, self.bad_evals = t["step"], t["best"], t["bad_evals"]
        self.last_eval_step, self.elapsed_before = t["last_eval_step"], t["elapsed"]
        batches.load_state_dict(extra["data"])
        self._saved_step = self.step
        self._truncate_metrics()
        log.info("resumed from step %d (%s)", self.step, found)
        return True

    # -- logging ------------------------------------------------------------------

    def _truncate_metrics(self) -> None:
        """Drop the records written after the checkpoint we resume from (later steps, and
        an evaluation of its own step that it does not count), and a last line that a
        killed process left half written."""
        if not self.metrics_path.exists() or not distributed.is_main():
            return

        def before(line: str) -> bool:
            kind, step = _record_key(line)
            return step < self.step or (step == self.step and (
                kind != "eval" or self.last_eval_step == self.step))
        keep = [ln for ln in self.metrics_path.read_text().splitlines() if before(ln)]
        replace_file(self.metrics_path, "".join(ln + "\n" for ln in keep))

    def _write_metrics(self, record: dict[str, Any]) -> None:
        """One line, whole or not at all: a full disk (DiskFullError) stops the run with the
        earlier lines and the last checkpoint as they were."""
        if distributed.is_main():
            append_file(self.metrics_path, json.dumps(record) + "\n")

    # -- one optimizer step ----------------------------------------------------------

    def _update(self, grads: Any) -> None:
        self.optimizer.update(self.bundle, grads)

    def _build_step_fns(self) -> None:
        """Built after a resume, because loading replaces the optimizer state object
        that a compiled update captures."""
        self.optimizer.init(self.bundle.trainable_parameters())
        grad_fn = nn.value_and_grad(self.bundle, lambda b: self.loss_fn(self.model, b))
        self._grad_fn, self._update_fn = grad_fn, self._update
        if self.config.compile:
            s1 = [self.bundle.state, mx.random.state]
            self._grad_fn = mx.compile(grad_fn, inputs=s1, outputs=s1)
            s2 = [self.bundle.state, self.optimizer.state]
            self._update_fn = mx.compile(self._update, inputs=s2, outputs=s2)

    def _share(self, batch: Any) -> tuple[Any, float]:
        """This rank's rows of the global batch, and the weight that makes the group's mean
        gradient the global batch's: size × (its tokens / all tokens)."""
        if self.size == 1:
            return batch, 1.0
        mine = shard(batch, self.rank, self.size)
        if not len(mine["inputs"]):  # fewer rows than ranks: a row that weighs nothing
            return shard(batch, 0, len(batch["inputs"])), 0.0
        total, own = self.count_fn(batch), self.count_fn(mine)
        return mine, self.size * (own[1] / total[1] if total[1] else own[0] / total[0])

    def _accumulate(self, next_batch: Callable[[], Any]) -> tuple[Any, _Window]:
        """Mean gradients over grad_accum micro-batches (of the global batch, across the
        group); stops on a non-finite loss before any update."""
        n = self.config.grad_accum
        acc, grads_sum = _Window(), None
        for _ in range(n):
            batch = next_batch()
            local, weight = self._share(batch)
            if self.config.compile:  # compiled functions take mx arrays only
                local = tree_map(lambda x: mx.array(x) if isinstance(x, np.ndarray) else x, local)
            (loss, logs), grads = self._grad_fn(local)
            if weight != 1.0:
                grads = tree_map(lambda g: g * weight, grads)
            grads_sum = grads if grads_sum is None else tree_map(mx.add, grads_sum, grads)
            mx.eval(loss, logs, grads_sum)  # bounds memory: one micro-batch graph at a time
            acc.add(weight * float(loss.item()),
                    {k: weight * float(mx.array(v).item()) for k, v in sorted(logs.items())},
                    *self.count_fn(batch))
        if self.size > 1:
            grads_sum = distributed.average_gradients(grads_sum)
            reduced = distributed.sum_floats([acc.loss, *acc.logs.values()])
            acc.loss = reduced[0] / self.size
            acc.logs = {k: v / self.size for k, v in zip(acc.logs, reduced[1:])}
        if not math.isfinite(acc.loss):
            self._non_finite("loss", acc.loss)
        if n > 1:
            grads_sum = tree_map(lambda g: g / n, grads_sum)
        return grads_sum, acc

    def _non_finite(self, what: str, value: float) -> None:
        ckpt = latest_checkpoint(self.out_dir)
        raise NonFiniteLossError(
            f"{what} became {value} at step {self.step + 1}; the last good checkpoint is "
            f"{ckpt if ckpt else 'none (nothing was saved yet)'}. The bad update was not applied.")

    def _evaluate(self) -> tuple[dict[str, float], bool]:
        self.model.eval()
        try:
            res = {k: float(v) for k, v in self.evaluate_fn(self.model).items()}
        finally:
            self.model.train()
        self.last_eval_step = self.step
        value = res[self.metric]
        better = self.best is None or (value < self.best if self.lower_is_better else value > self.best)
        if better:
            self.best, self.bad_evals = value, 0
            if distributed.is_main():
                self.save_best(self.model, self.out_dir / "best")
                write_json(self.out_dir / "best.json", {"step": self.step, **res})
        else:
            self.bad_evals += 1
        self._write_metrics({"kind": "eval", "step": self.step, "elapsed": self._elapsed(),
                             "best": better, **{f"eval_{k}": v for k, v in res.items()}})
        log.info("step %d: %s (best %s %.4g)", self.step, res, self.metric, self.best)
        return res, better

    def _clear_previous_run(self) -> None:
        """Starting over in a run folder (ours: claimed above): an older run's checkpoints
        would otherwise outrank the new ones by step number."""
        if latest_checkpoint(self.out_dir) is not None:
            log.warning("starting over in %s: its earlier checkpoints are removed", self.out_dir)
        shutil.rmtree(self.out_dir / CKPT_DIR, ignore_errors=True)
        for name in ("metrics.jsonl", "best.json"):
            (self.out_dir / name).unlink(missing_ok=True)

    # -- the loop -----------------------------------------------------------------

    def _start(self, batches: BatchSource, resume: bool) -> None:
        if distributed.is_main():
            claim_run_folder(self.out_dir)
        self._t0 = time.monotonic()
        self._saved_step = -1
        self._reset_counters()
        if not (resume and self._resume(batches)):
            mx.random.seed(self.config.seed)
            np.random.seed(self.config.seed)
            random.seed(self.config.seed)
            if distributed.is_main():
                self._clear_previous_run()
        self._build_step_fns()
        self.model.train()

    def _stop_requested(self, sigint: "_Sigint") -> bool:
        """Ctrl-C reaches the ranks at different moments; they stop at the same step."""
        if self.size == 1:
            return sigint.requested
        return distributed.sum_floats([float(sigint.requested)])[0] > 0

    def _optimizer_step(self, next_batch: Callable[[], Any]) -> tuple[_Window, Optional[float]]:
        grads, acc = self._accumulate(next_batch)
        gnorm = None
        if self.config.grad_clip is not None:
            grads, norm = optim.clip_grad_norm(grads, self.config.grad_clip)
            gnorm = float(norm.item())
            if not math.isfinite(gnorm):
                self._non_finite("gradient norm", gnorm)
        self._in_update = True  # an interrupt in here must not save a half-updated state
        self._update_fn(grads)
        mx.eval(self.bundle.parameters(), self.optimizer.state)
        self.step += 1
        self._in_update = False
        return acc, gnorm

    def _log_train(self, win: _Window, gnorm: Optional[float], bar: Any) -> float:
        dt = max(time.monotonic() - win.t0, 1e-9)
        loss = win.loss / win.n
        rec = {"kind": "train", "step": self.step, "loss": loss,
               "lr": float(self.optimizer.learning_rate.item()),
               **{k: v / win.n for k, v in win.logs.items()},
               "items_per_s": win.items / dt, "tokens_per_s": win.tokens / dt,
               "elapsed": self._elapsed()}
        if gnorm is not None:
            rec["grad_norm"] = gnorm
        self._write_metrics(rec)
        bar.set_postfix(loss=f"{loss:.4f}", items_s=f"{rec['items_per_s']:.1f}",
                        tok_s=f"{rec['tokens_per_s']:.0f}")
        return loss

    def train(self, batches: BatchSource, resume: bool = False) -> TrainResult:
        """Run to max_steps, an early stop or an interrupt (see TrainResult.status).

        Raises NonFiniteLossError on a NaN/inf loss, leaving the last checkpoint as is, and
        OutputBusyError when another process trains in ``out_dir``.
        """
        if not distributed.is_main():  # rank 0 writes, so rank 0 alone holds the lock
            return self._train(batches, resume)
        with locks.hold(self.out_dir):
            return self._train(batches, resume)

    def _train(self, batches: BatchSource, resume: bool) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.config
        self._start(batches, resume)
        it = iter(batches)

        def next_batch() -> Any:
            nonlocal it
            try:
                return next(it)
            except StopIteration:
                it = iter(batches)  # next epoch
                for batch in it:
                    return batch
                raise RuntimeError("the batch source yields no batches") from None

        # Position and RNG at the start of the current step: what an interrupt saves.
        start = (copy.deepcopy(batches.state_dict()), capture_rng_state())
        bar = tqdm(total=cfg.max_steps, initial=self.step, dynamic_ncols=True, desc="train",
                   disable=not (cfg.progress and distributed.is_main()))
        status, last_loss, win = "completed", None, _Window()
        self._in_update = False
        try:
            with _Sigint() as sigint:
                while self.step < cfg.max_steps:
                    acc, gnorm = self._optimizer_step(next_batch)
                    start = (copy.deepcopy(batches.state_dict()), capture_rng_state())
                    win.merge(acc)
                    if self.step % max(cfg.log_every, 1) == 0 or self.step == cfg.max_steps:
                        last_loss, win = self._log_train(win, gnorm, bar), _Window()
                    bar.update(1)
                    if self.evaluate_fn and cfg.eval_every and self.step % cfg.eval_every == 0:
                        self._evaluate()
                        start = (start[0], capture_rng_state())  # eval may draw random numbers
                        if cfg.patience is not None and self.bad_evals >= cfg.patience:
                            status = "early_stopped"
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self._save(*start)
                    if status == "early_stopped":
                        break
                    if self._stop_requested(sigint):
                        status = "interrupted"
                        break
        except KeyboardInterrupt:
            status = "interrupted"
        finally:
            bar.close()

        if status == "interrupted":
            if self._in_update:
                log.warning("interrupted during an update: not saving; the last checkpoint is %s",
                            latest_checkpoint(self.out_dir))
            elif self._saved_step != self.step:
                self._save(*start)
            log.warning("interrupted at step %d: rerun the same command to resume (checkpoint %s)",
                        self.step, latest_checkpoint(self.out_dir))
        else:
            if status == "early_stopped":
                log.info("early stop: no %s improvement in %d evaluations", self.metric, cfg.patience)
            if self.evaluate_fn and self.last_eval_step != self.step:
                self._evaluate()
            if self._saved_step != self.step:
                self._save(start[0], capture_rng_state())
            if cfg.plot and distributed.is_main():
                self._plot()
        distributed.barrier()  # rank 0's checkpoint and model folder are complete
        return TrainResult(status, self.step, self.best, latest_checkpoint(self.out_dir), last_loss)

    def _plot(self) -> None:
        """metrics.png is a convenience: a full disk for it is a warning, not the end of a run
        whose last checkpoint is already saved (the plot is redrawn when the run is rerun)."""
        try:
            plot_metrics(self.metrics_path, self.out_dir / "metrics.png")
        except DiskFullError as e:
            log.warning("the metrics plot was not written: %s", e)


def _record_key(line: str) -> tuple[str, float]:
    """(kind, step) of one metrics.jsonl line; a line cut short by a crash comes after all."""
    try:
        record = json.loads(line)
        return str(record.get("kind")), int(record.get("step", 0))
    except (ValueError, AttributeError):
        return "torn", math.inf


def plot_metrics(metrics_jsonl: str | os.PathLike, png_path: str | os.PathLike) -> Optional[Path]:
    """Training loss and dev-metric curves as a PNG; skipped (None) without matplotlib.
    The PNG replaces ``png_path`` whole; a full disk is a DiskFullError naming it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.info("matplotlib is not installed: skipping the metrics plot "
                 "(pip install 'mlx-baldwhisper[plot]')")
        return None
    records = [json.loads(ln) for ln in Path(metrics_jsonl).read_text().splitlines() if ln.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    keys = sorted({k for r in evals for k in r if k.startswith("eval_")})
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if keys else 1, 1)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax.set(xlabel="step", ylabel="training loss", title="loss")
    if keys:
        ax2 = fig.add_subplot(1, 2, 2)
        for k in keys:
            pts = [(r["step"], r[k]) for r in evals if isinstance(r.get(k), (int, float))]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k[5:])
        ax2.set(xlabel="step", title="dev")
        ax2.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    replace_file(png_path, png.getvalue())
    return Path(png_path)
