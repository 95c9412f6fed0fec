"""Stage 0: fine-tune Whisper on the target language; the result is the teacher.

Decoder-only training with a frozen encoder is the laptop default: the encoder's
outputs are computed once and cached, so a step costs only the decoder. Full
fine-tuning (``freeze_encoder=False``) runs the encoder forward and backward on
every batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import click

from ..folders import run_folder
from ..model import Whisper
from .common import StageData, ce_loss, dev_evaluator, model_copy, model_saver, stage_settings
from .data import PACK_PROB, PROMPT_PROB, TIMESTAMP_PROB
from .stage import ModelInput, Stage
from .trainer import TrainConfig, Trainer, TrainResult


@dataclass
class FinetuneConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, warmup_steps=20, max_steps=300))
    batch_size: int = 8
    freeze_encoder: bool = True
    eval_limit: Optional[int] = 100  # dev clips scored during training (all at the end)
    # Share of clips trained on timestamped targets (one segment <|0.00|> text <|end|>),
    # the rest on text alone: keeps the timestamps long-form transcription relies on.
    timestamp_prob: float = TIMESTAMP_PROB
    # Share of the packed windows (consecutive clips joined into <= 30-s windows with a
    # timestamped segment each, packing.py) trained as windows, drawn per pack and epoch.
    pack_prob: float = PACK_PROB
    # Share of items conditioned on the previous clip's text (<|startofprev|>), as
    # transcribe() conditions each window on the text before it.
    prompt_prob: float = PROMPT_PROB


def finetune(model: Whisper, data: StageData, cfg: FinetuneConfig, out: Path,
             resume: bool = False, force: bool = False) -> TrainResult:
    """Train ``model`` in place; the best dev-WER weights are written to ``out``."""
    if not cfg.freeze_encoder and data.features is not None:
        raise ValueError("full fine-tuning needs data prepared without cached features")
    trainer = Trainer(
        model, ce_loss, cfg.train, run_folder(out),
        trainable_filter=["decoder."] if cfg.freeze_encoder else None,
        evaluate_fn=dev_evaluator(data, cfg.eval_limit),
        save_best=model_saver(Path(out), {"stage": "finetune", "language": data.language,
                                          "freeze_encoder": cfg.freeze_encoder,
                                          **cfg.train.to_dict()}, force),
        settings=stage_settings(cfg, data),
    )
    return trainer.train(data.batches(cfg.batch_size, cfg.train.seed, timestamp_prob=cfg.timestamp_prob,
                                      pack_prob=cfg.pack_prob, model=model, prompt_prob=cfg.prompt_prob), resume=resume)


def _configure(cfg, full: bool = False) -> None:
    cfg.finetune.freeze_encoder = not full


STAGE = Stage(
    name="teacher", command="finetune", config="finetune",
    summary="Fine-tune on a language (the teacher).",
    inputs=(ModelInput("base", "--model", "Starting model (default: the config's, else the embedded base).",
                       required=False),),
    student=lambda i: model_copy(i.models["base"]),  # the base stays untuned (recover.untuned_kl_weight)
    train=lambda s, i, out: finetune(s, i.data, i.cfg.finetune, out, resume=i.resume, force=i.force),
    options=(click.option("--full", is_flag=True, help="Train the encoder too (slow; no feature cache)."),),
    configure=_configure,
)
