"""A training stage described as data.

Each stage module exports its :class:`Stage`; ``stages.py`` lists them in recipe order.
The recipe, ``recipe --stages`` and the CLI subcommands are all loops over that list, so
adding a stage is one module plus one line there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ..model import Whisper
from .common import StageData
from .trainer import TrainResult


@dataclass
class StageInputs:
    """What a stage starts from. ``models`` maps a role ("base" = the starting model,
    "teacher", "merged", or "student" given outright) to a model; the recipe fills it
    lazily, training earlier stages on demand, the CLI from its options."""

    models: Mapping[str, Whisper]
    data: StageData
    cfg: Any  # the RecipeConfig, with the command line's overrides applied
    # {"alpha", "beta", "merge_weights"}: searched, or the config's (RecipeConfig.merge_choice)
    merge_choice: Callable[[], dict]
    resume: bool = True
    force: bool = False


@dataclass(frozen=True)
class ModelInput:
    """A model a stage needs, and the option that names it on the command line."""

    role: str
    option: str
    help: str
    required: bool = True


@dataclass(frozen=True)
class Stage:
    name: str  # in the recipe: its results row and model folder OUT/name
    summary: str  # one line: the subcommand's help
    config: str  # the RecipeConfig field holding its settings
    inputs: tuple[ModelInput, ...]
    student: Callable[[StageInputs], Whisper]  # the model to train, from the inputs
    train: Callable[[Whisper, StageInputs, Path], TrainResult]  # train it, writing Path
    command: Optional[str] = None  # CLI subcommand; None: only inside the recipe
    options: tuple[Callable, ...] = ()  # extra click options of the subcommand
    configure: Callable[..., None] = lambda cfg, **values: None  # apply those options
    record: Callable[[StageInputs], dict[str, Any]] = field(default=lambda inputs: {})

    @property
    def needs(self) -> tuple[str, ...]:
        """Earlier stages whose models this one starts from."""
        return tuple(i.role for i in self.inputs if i.required and i.role != "base")
