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

from ..model import Whisper
from ..folders import run_folder
from .common import StageData, ce_loss, dev_evaluator, model_saver, stage_settings
from .trainer import TrainConfig, Trainer, TrainResult


@dataclass
class FinetuneConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, warmup_steps=20, max_steps=300))
    batch_size: int = 8
    freeze_encoder: bool = True
    eval_limit: Optional[int] = 100  # dev clips scored during training (all at the end)


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
    return trainer.train(data.batches(cfg.batch_size, cfg.train.seed), resume=resume)
