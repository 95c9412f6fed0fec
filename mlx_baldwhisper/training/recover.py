"""BaldWhisper stage 1b: recover a merged (or layer-removed) decoder by distillation.

The student is the merged model; the teacher is the frozen fine-tuned model. The
loss is ``λ·CE(labels) + γ·T²·KL(teacher_T ‖ student_T)`` with a learnable
temperature T optimised jointly with the student. Both share the frozen encoder, so
the cached encoder features serve both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx

from ..model import Whisper
from ..folders import run_folder
from .common import (StageData, decoder_input, dev_evaluator, model_saver, stage_settings,
                     teacher_logits)
from .losses import LearnableTemperature, distillation_loss
from .trainer import TrainConfig, Trainer, TrainResult


@dataclass
class RecoverConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, warmup_steps=20, max_steps=300))
    batch_size: int = 8
    ce_weight: float = 1.0  # λ
    kl_weight: float = 1.0  # γ
    temperature: float = 2.0  # initial value of the learnable temperature
    eval_limit: Optional[int] = 100


def distill_loss_fn(teacher: Whisper, temperature: LearnableTemperature, ce_weight: float,
                    kl_weight: float):
    """The Trainer optimises ``temperature`` with the student (it is an extra module)."""
    def loss_fn(student, batch):
        feats = decoder_input(student, batch)
        inputs = mx.array(batch["inputs"])
        logits = student.decoder(inputs, feats)[0]
        return distillation_loss(logits, teacher_logits(teacher, inputs, feats), mx.array(batch["targets"]),
                                 mx.array(batch["mask"]), temperature(), ce_weight, kl_weight)
    return loss_fn


def recover(student: Whisper, teacher: Whisper, data: StageData, cfg: RecoverConfig, out: Path,
            stage: str = "recover", resume: bool = False, fraction: float = 1.0,
            evaluate: bool = True, force: bool = False) -> TrainResult:
    teacher.freeze()
    temperature = LearnableTemperature(cfg.temperature)
    trainer = Trainer(
        student, distill_loss_fn(teacher, temperature, cfg.ce_weight, cfg.kl_weight), cfg.train,
        run_folder(out), trainable_filter=["decoder."],
        extra_modules={"temperature": temperature},
        evaluate_fn=dev_evaluator(data, cfg.eval_limit) if evaluate else None,
        save_best=model_saver(Path(out), {"stage": stage, "ce_weight": cfg.ce_weight,
                                          "kl_weight": cfg.kl_weight, **cfg.train.to_dict()}, force),
        settings=stage_settings(cfg, data, stage=stage, train_fraction=fraction),
    )
    return trainer.train(data.batches(cfg.batch_size, cfg.train.seed, fraction), resume=resume)
