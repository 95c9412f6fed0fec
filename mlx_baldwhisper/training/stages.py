"""The BaldWhisper training stages, in recipe order: one line per stage."""

from __future__ import annotations

from . import audio_context, finetune, recover, shear
from .stage import Stage

STAGES: tuple[Stage, ...] = (
    finetune.STAGE,  # teacher: fine-tune on the language
    recover.MERGED,  # merged: merge decoder layers, recover by distillation
    recover.REMOVED,  # removed: the layer-removal baseline at the same budget
    shear.STAGE,  # final: factor the embedding, distil again
    audio_context.STAGE,  # final-ctx: the final model taught a short audio context
)
BY_NAME = {s.name: s for s in STAGES}
