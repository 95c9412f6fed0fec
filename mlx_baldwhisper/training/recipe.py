"""The whole BaldWhisper recipe: fine-tune → merge (+search) → recover → shear → audio
context → evaluate.

Writes ``DIR/teacher``, ``DIR/merged``, ``DIR/removed`` (the layer-removal baseline with
the same budget as ``merged``), ``DIR/final`` (merged + sheared + distilled),
``DIR/final-ctx`` (final, taught to encode only the speech plus a margin), and
``DIR/results.json`` + ``DIR/results.md``. Every hyper-parameter lives in
:class:`RecipeConfig`, saved as ``DIR/config.json``. A finished stage is not run again
when the recipe is restarted; an unfinished one resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from .. import locks
from ..audio_context import AudioContext, of_model
from ..decoding import DecodingOptions
from ..diskspace import replace_file
from ..evaluate import evaluate, evaluate_long_form, save_hypotheses
from ..folders import claim_run_folder
from ..load import load_model
from ..model import Whisper
from ..surgery import DEFAULT_ALPHA, DEFAULT_BETA
from .common import cache_features_shared, load_data, write_json
from .distributed import is_main
from .audio_context import AudioContextConfig
from .finetune import FinetuneConfig
from .merge_search import MergeSearchConfig, merge_search
from .recover import RecoverConfig
from .shear import ShearConfig
from .stage import Stage, StageInputs
from .stages import BY_NAME, STAGES
from .trainer import check_resumable


@dataclass
class RecipeConfig:
    model: Optional[str] = None  # starting checkpoint (default: embedded whisper-base)
    language: str = "ha"
    # A language Whisper has no token for is mapped to one it has, e.g. {"bm": "ha"}.
    language_token: Optional[str] = None
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    search: Optional[MergeSearchConfig] = field(default_factory=MergeSearchConfig)
    alpha: float = DEFAULT_ALPHA  # used when search is None
    beta: float = DEFAULT_BETA
    # Per-group merge weights (``convert.py --merge-weights`` syntax); when set, used in
    # place of alpha/beta when search is None.
    merge_weights: Optional[str] = None
    # Which decoder layers merge (``convert.py --merge-groups`` syntax); None is the paper's
    # adjacent pairs "0,1;2,3;4,5". The layer-removal baseline keeps as many layers.
    merge_groups: Optional[str] = None
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    shear: ShearConfig = field(default_factory=ShearConfig)
    # The final model taught a short audio context (None: the recipe stops at final).
    audio_context: Optional[AudioContextConfig] = field(default_factory=AudioContextConfig)
    # Train every stage on short-context features from the start: the starting model gets
    # this audio context (e.g. "dynamic" or {"mode": "dynamic", "margin": 64}), features
    # are cached over it (several times cheaper) and every model keeps it. None: 30-s windows.
    feature_context: Optional[Any] = None
    # Windows without speech (noise, silence; empty transcript) added to the training clips,
    # as this share of their number, so the model writes nothing on silence (silence.py).
    silence_share: float = 0.02
    eval_batch_size: int = 16
    # Cap on generated tokens when scoring (None: Whisper's 224). A cap bounds the time an
    # untuned model spends in repetition loops; it cannot change a transcript shorter than it.
    eval_sample_len: Optional[int] = None
    # Each model is also scored on the dev clips joined into recordings of about this many
    # seconds, transcribed by transcribe() with timestamps (0 = off): what users run the
    # models on. ``long_form_gap`` is the silence between the joined clips.
    long_form_seconds: float = 180.0
    long_form_gap: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def merge_choice(self) -> dict[str, Any]:
        """The configured merge weights (used when there is no search)."""
        if self.merge_weights:
            return {"alpha": None, "beta": None, "merge_weights": self.merge_weights}
        return {"alpha": self.alpha, "beta": self.beta, "merge_weights": None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RecipeConfig":
        return _build(cls, d)


def _build(cls, d: Any, defaults: Any = None):
    """Nested dicts (a JSON config file) into the nested config dataclasses. A key left
    out keeps its default, the enclosing section's own (a stage's ``train`` block keeps
    that stage's learning rate and warm-up, not TrainConfig's)."""
    if not dataclasses.is_dataclass(cls) or not isinstance(d, dict):
        return d
    hints = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(hints)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings: {', '.join(sorted(unknown))}")
    defaults, kwargs = defaults if defaults is not None else cls(), {}
    for name, value in d.items():
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = _build(type(default), value, default)
        else:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(defaults, **kwargs)


def load_config(path: Optional[str]) -> RecipeConfig:
    if path is None:
        return RecipeConfig()
    try:
        return RecipeConfig.from_dict(json.loads(Path(path).read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _params(model: Whisper) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


STEPS = ("untuned", "search", *(s.name for s in STAGES))  # what --stages may name


class _StageModels(Mapping[str, Whisper]):
    """The models stages start from, by role: the base model, then each stage's model,
    trained (or loaded from OUT) the first time a later stage asks for it."""

    def __init__(self, recipe: "Recipe", base: Whisper):
        self.recipe, self.models = recipe, {"base": base}

    def __getitem__(self, role: str) -> Whisper:
        if role not in self.models:
            if role not in BY_NAME:
                raise KeyError(role)
            self.models[role] = self.recipe.train_stage(BY_NAME[role])
        return self.models[role]

    def __iter__(self) -> Iterator[str]:
        return iter(["base", *BY_NAME])

    def __len__(self) -> int:
        return 1 + len(BY_NAME)


class Recipe:
    """``stages`` limits what this process runs; a stage that is not selected but is needed
    (the teacher, the merged model) is loaded from ``out``. Stages that do not depend on
    each other (``removed`` vs ``merged``/``final``, ``untuned`` vs ``teacher``) can so run
    as separate processes, one per core, writing into the same results."""

    def __init__(self, train: str, dev: str, out: str, cfg: RecipeConfig, resume: bool = True,
                 stages: Optional[tuple[str, ...]] = None, force: bool = False,
                 cache_dir: Optional[str] = None, clear_cache: bool = False):
        unknown = set(stages or ()) - set(STEPS)
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(sorted(unknown))}; "
                             f"choose from {', '.join(STEPS)}")
        self.train, self.dev, self.out, self.cfg, self.resume = train, dev, Path(out), cfg, resume
        self.stages = tuple(stages or STEPS)
        self.force, self.cache_dir = force, cache_dir or str(self.out / "cache")
        self.clear_cache = clear_cache
        self.results_path = self.out / "results.json"
        self.results: dict[str, Any] = {"stages": {}}
        self._reload()

    def _reload(self) -> None:
        """Take in what other processes recorded; this process's own records win."""
        if self.results_path.exists():
            disk = json.loads(self.results_path.read_text())
            mine = self.results.get("stages", {})
            disk.setdefault("stages", {}).update(mine)
            disk.update({k: v for k, v in self.results.items() if k != "stages"})
            self.results = disk

    def _save_results(self) -> None:
        """Each file is replaced whole; a full disk is a DiskFullError naming it, after the
        stage's model folder was saved (a rerun resumes the stage at its last step and re-scores it)."""
        self._reload()
        if is_main():  # with several processes, rank 0 writes every file of the recipe
            write_json(self.results_path, self.results)
            replace_file(self.out / "results.md", results_table(self.results))

    def _record(self, name: str, model: Whisper, seconds: float, **extra) -> None:
        data = self.inputs.data
        options = DecodingOptions(without_timestamps=True, temperature=0.0,
                                  sample_len=self.cfg.eval_sample_len)
        context = of_model(model)  # a model with a short audio context is scored at it
        features = data.features if context.is_full or data.features is None else (
            cache_features_shared(model, data.dev, data.features.directory, context=context))
        r = evaluate(model, data.dev, language=data.language, batch_size=self.cfg.eval_batch_size,
                     features=features, options=options)
        if is_main():
            save_hypotheses(r, self.out / "hypotheses" / f"{name}.tsv")
            print(f"[{name}] dev WER {100 * r['wer']:.2f}%  CER {100 * r['cer']:.2f}%")
        self.results["stages"][name] = {"wer": r["wer"], "cer": r["cer"], "n": r["n"],
                                        "params": _params(model), "train_seconds": round(seconds, 1),
                                        "eval_seconds": round(r["seconds"], 1),
                                        **self._long_form(name, model), **extra}
        if not context.is_full:
            self.results["stages"][name]["audio_context"] = context.to_dict()
        self._save_results()

    def _long_form(self, name: str, model: Whisper) -> dict[str, Any]:
        """Long-form scores of ``model`` on the dev clips (nothing when switched off)."""
        if not self.cfg.long_form_seconds:
            return {}
        data = self.inputs.data
        r = evaluate_long_form(model, data.dev, self.cfg.long_form_seconds, language=data.language,
                               gap=self.cfg.long_form_gap, batch_size=self.cfg.eval_batch_size,
                               progress=is_main())
        if is_main():
            save_hypotheses(r, self.out / "hypotheses" / f"{name}.long.tsv")
            print(f"[{name}] long-form WER {100 * r['wer']:.2f}%  CER {100 * r['cer']:.2f}% "
                  f"({r['n']} recordings, {r['audio_seconds']:.0f} s)")
        return {"long_form_wer": r["wer"], "long_form_cer": r["cer"], "long_form_n": r["n"],
                "long_form_eval_seconds": round(r["seconds"], 1)}

    def _done(self, name: str) -> bool:
        if name not in self.results["stages"] or (not self.resume and name in self.stages):
            return False
        return name == "untuned" or (self.out / name).exists()

    def run(self) -> dict[str, Any]:
        """Each selected stage's output is locked first: another process running one of the
        same stages into ``out`` is refused at once (OutputBusyError), while processes
        running different stages (``--stages``) share ``out``."""
        with contextlib.ExitStack() as held:
            if is_main():
                claim_run_folder(self.out, self.force)
                for step in self.stages:
                    held.enter_context(locks.hold(self.out / step))
            return self._run()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        self._write_config()
        base = load_model(cfg.model)
        if cfg.language_token:
            base.extra_config["language_tokens"] = {cfg.language: cfg.language_token}
        if cfg.feature_context is not None:
            base.extra_config["audio_context"] = AudioContext.parse(cfg.feature_context).to_dict()
        start = time.perf_counter()
        data = load_data(base, self.train, self.dev, cfg.language, self.cache_dir,
                         clear_cache=self.clear_cache, silence_share=cfg.silence_share)
        self.results["data"] = {"train": len(data.train), "dev": len(data.dev),
                                "skipped": data.skipped, "seconds": round(time.perf_counter() - start, 1)}
        self.inputs = StageInputs(_StageModels(self, base), data, cfg, self._merge_choice,
                                  self.resume, self.force)
        if "untuned" in self.stages and not self._done("untuned"):
            self._record("untuned", base, 0.0)
        if "search" in self.stages:
            self._merge_choice()
        for stage in STAGES:
            if stage.name in self.stages and getattr(cfg, stage.config) is not None:
                self.inputs.models[stage.name]
        self._summarise()
        return self.results

    def _merge_choice(self) -> dict[str, Any]:
        """Merge weights from the search (run once, recorded in the results), or the config's."""
        if self.cfg.search is None:
            return self.cfg.merge_choice()
        self._reload()
        if "search" not in self.results:
            self._require("search")
            t0 = time.perf_counter()
            found = merge_search(self.inputs.models["teacher"], self.inputs.data, self.cfg.search,
                                 self.out / "search", self.cfg.merge_groups, self.resume)
            found["seconds"] = round(time.perf_counter() - t0, 1)
            self.results["search"] = found
            self._save_results()
        found = self.results["search"]
        return {k: found.get(k) for k in ("alpha", "beta", "merge_weights")}

    def train_stage(self, stage: Stage) -> Whisper:
        """A finished stage's model is loaded from OUT; an unfinished one is trained (or resumed)."""
        self._reload()
        if self._done(stage.name):
            print(f"[{stage.name}] already done: {self.out / stage.name}")
            return load_model(str(self.out / stage.name))
        self._require(stage.name)
        t0 = time.perf_counter()
        result = stage.train(stage.student(self.inputs), self.inputs, self.out / stage.name)
        seconds = time.perf_counter() - t0
        if result.status == "interrupted":
            raise KeyboardInterrupt(f"{stage.name} interrupted at step {result.step}")
        model = load_model(str(self.out / stage.name))
        self._record(stage.name, model, seconds, status=result.status, steps=result.step,
                     **stage.record(self.inputs))
        return model

    def _write_config(self) -> None:
        """``OUT/config.json`` records the run; resuming under other settings is refused."""
        path = self.out / "config.json"
        new = json.loads(json.dumps({"train": self.train, "dev": self.dev, **self.cfg.to_dict()},
                                    default=str))
        if path.exists() and self.resume:
            old = json.loads(path.read_text())
            if self.results_path.exists() and "search" in json.loads(self.results_path.read_text()):
                old.pop("search", None)  # done and recorded: its settings (or defaults) may change
            check_resumable(self.out, old, new)
        if is_main():
            write_json(path, new)

    def _require(self, name: str) -> None:
        if name not in self.stages:
            raise ValueError(f"stage {name!r} is needed but not selected and not found in {self.out}; "
                             f"run it first (--stages {name})")

    def _summarise(self) -> None:
        s = self.results["stages"]
        teacher, final = s.get("teacher"), s.get("final")
        if teacher and final and final["wer"] > 0:
            self.results["wer_teacher_over_final"] = teacher["wer"] / final["wer"]
        self._save_results()


def _percent(r: dict[str, Any], key: str) -> str:
    """A rate as a percentage, "–" when it was not measured (or is NaN)."""
    v = r.get(key)
    return "–" if v is None or v != v else f"{100 * v:.2f}"


def results_table(results: dict[str, Any]) -> str:
    rows = ["| model | params | dev WER % | dev CER % | long-form WER % | long-form CER % | "
            "train time (s) | eval time (s) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in results["stages"].items():
        evaluating = r["eval_seconds"] + r.get("long_form_eval_seconds", 0.0)
        rows.append(f"| {name} | {r['params'] / 1e6:.1f}M | {_percent(r, 'wer')} | {_percent(r, 'cer')} | "
                    f"{_percent(r, 'long_form_wer')} | {_percent(r, 'long_form_cer')} | "
                    f"{r['train_seconds']:.0f} | {evaluating:.0f} |")
    if "wer_teacher_over_final" in results:
        rows.append(f"\nWER_teacher / WER_final = {results['wer_teacher_over_final']:.3f} (goal ≥ 0.95)")
    return "\n".join(rows) + "\n"
