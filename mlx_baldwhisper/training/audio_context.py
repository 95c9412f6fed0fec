"""Stage 3: teach a model a short audio context, so its encoder skips the padding.

Whisper pads every clip to 30 s; on a 5-s clip most of the encoder's work is
silence. A model encoded over only the speech plus a margin (audio_context.py) loops
or stops early unless it learns to. Following FUTO's whisper-acft, the model at full
context is the teacher and the same model at a short context the student: the
student's decoder states at every layer (teacher-forced on the training transcripts)
are pulled to the teacher's, plus a KL on the logits. The context is jittered in
training: each clip is encoded over several margins around the one used at inference.

The cheap form (the default) trains the decoder on cached short-context encoder
features; ``train_encoder`` also trains the encoder, on the fly. The model is saved
with its policy (``"audio_context"`` in config.json), so ``transcribe`` uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from .. import backends
from ..audio_context import DEFAULT_BLOCK, DEFAULT_MARGIN, AudioContext
from ..features import FeatureCache, pad_stack, speech_frames
from ..folders import run_folder
from ..model import Whisper, padding_mask
from .common import (StageData, audio_padding, cache_features_shared, dev_evaluator, model_copy,
                     model_saver, stage_settings, training_packs, scored)
from .data import PACK_PROB, PROMPT_PROB, Batcher
from .packing import PackedWindow
from .losses import distillation_loss, hidden_state_mse
from .stage import ModelInput, Stage, StageInputs
from .trainer import TrainConfig, Trainer, TrainResult


@dataclass
class AudioContextConfig:
    # lr 1e-5: at 5e-5 the distillation loss rose in the first steps and the decoder drifted
    # towards the training language (RESULTS.md "Session 10")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, warmup_steps=10, max_steps=150))
    batch_size: int = 8
    margin: int = DEFAULT_MARGIN  # positions past the speech at inference (saved with the model)
    block: int = DEFAULT_BLOCK
    jitter: int = 64  # training margins spread over margin ± jitter ...
    variants: int = 3  # ... as this many contexts per clip, each cached once
    hidden_weight: float = 1.0  # MSE of every decoder layer's states to the teacher's
    kl_weight: float = 1.0  # T²·KL of the logits to the teacher's
    ce_weight: float = 0.0  # CE on the transcripts (0: pure distillation, labels unused)
    temperature: float = 1.0
    train_encoder: bool = False  # also train the encoder (no short-feature cache; slower)
    eval_limit: Optional[int] = 100
    timestamp_prob: float = 0.5  # clips whose targets carry timestamps (distilled like text)
    pack_prob: float = PACK_PROB  # packed windows trained as windows (packing.py), cached per context
    prompt_prob: float = PROMPT_PROB  # items conditioned on the previous clip's text

    def policy(self) -> AudioContext:
        return AudioContext(mode="dynamic", margin=self.margin, block=self.block)

    def margins(self) -> list[int]:
        """The training margins: ``variants`` values spread evenly over margin ± jitter."""
        spread = np.linspace(-self.jitter, self.jitter, self.variants) if self.variants > 1 else [0]
        return sorted({max(0, int(round(self.margin + o))) for o in spread})


class ShortContextBatcher(Batcher):
    """Batches that also carry each clip at a short context, one of ``contexts`` drawn per
    clip from (seed, epoch, clip), so a resumed run sees the same draws. With cached
    short features (``caches``) the batch holds them; without, the clip's mel cut to its
    context, for an encoder that trains."""

    def __init__(self, items, batch_size: int, seed: int, features: FeatureCache,
                 contexts: Sequence[AudioContext], caches: Optional[Sequence[FeatureCache]],
                 n_audio_ctx: int, timestamp_prob: float = 0.0,
                 packs: Sequence[PackedWindow] = (), pack_prob: float = 0.0,
                 prompt_prob: float = 0.0, sot_prev: Optional[int] = None):
        super().__init__(items, batch_size, seed=seed, features=features, include_mel=False,
                         timestamp_prob=timestamp_prob, packs=packs, pack_prob=pack_prob,
                         prompt_prob=prompt_prob, sot_prev=sot_prev)
        self.contexts, self.caches, self.n_audio_ctx = list(contexts), caches, n_audio_ctx

    def collate(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        out = super().collate(idx)
        rng = np.random.default_rng([int(self.seed), self.epoch, *map(int, idx)])
        draws = rng.integers(len(self.contexts), size=len(idx))
        chosen = [self.items[i] for i in idx]
        if self.caches is not None:
            feats = [self.caches[d].get(x) for d, x in zip(draws, chosen)]
            out["student_features"], _ = pad_stack(feats)
            lengths = [f.shape[0] for f in feats]
        else:
            frames = [speech_frames(x) for x in chosen]
            lengths = [self.contexts[d].positions_for(n, self.n_audio_ctx) for d, n in zip(draws, frames)]
            mel = np.zeros((len(idx), 2 * max(lengths), chosen[0].mel.shape[-1]), np.float32)
            for k, (x, n) in enumerate(zip(chosen, frames)):
                n = min(n, mel.shape[1])
                mel[k, :n] = x.mel[:n]  # zero past the speech, as transcribe() pads
            out["student_mel"] = mel
        out["student_lengths"] = np.array(lengths, np.int32)
        return out


def frozen_copy(model: Whisper) -> Whisper:
    """The teacher: the same weights, frozen, in a model of its own (``model_copy``)."""
    copy = model_copy(model)
    copy.freeze()
    return copy


def context_loss_fn(teacher: Whisper, cfg: AudioContextConfig):
    """The teacher sees the full-context features, the student its short context."""
    def loss_fn(student: Whisper, batch: dict):
        inputs, mask, at = mx.array(batch["inputs"]), mx.array(batch["mask"]), scored(batch)
        with backends.inference():
            t_states, t_logits = teacher.decoder.layer_states(
                inputs, mx.array(batch["features"]).astype(teacher.dtype), audio_padding(batch), at.rows)
        t_states = [mx.stop_gradient(s) for s in t_states]
        lengths = mx.array(batch["student_lengths"])
        if "student_mel" in batch:
            mel = mx.array(batch["student_mel"]).astype(student.dtype)
            feats = student.encoder(mel, lengths)
        else:
            feats = mx.array(batch["student_features"]).astype(student.dtype)
        pad = padding_mask(lengths, feats.shape[1])
        states, logits = student.decoder.layer_states(inputs, feats, pad, at.rows)
        loss, parts = distillation_loss(logits, mx.stop_gradient(t_logits), at.targets,
                                        at.mask, cfg.temperature, cfg.ce_weight, cfg.kl_weight)
        if cfg.hidden_weight:
            hidden = hidden_state_mse(states, t_states, mask)
            loss = loss + cfg.hidden_weight * hidden
            parts["hidden"] = hidden
        return loss, parts
    return loss_fn


def short_context_data(model: Whisper, data: StageData, cfg: AudioContextConfig
                       ) -> tuple[list[AudioContext], Optional[list[FeatureCache]], StageData,
                                  StageData]:
    """The training contexts, their cached features (unless the encoder trains), the data
    with full-context features (the teacher's), and with dev features at the inference
    context (for model selection)."""
    if data.features is None:
        raise ValueError("the audio-context stage needs cached full-context features (a frozen "
                         "encoder) for its teacher")
    folder = data.features.directory
    if not data.features.context.is_full:  # the model already had a short context
        full = cache_features_shared(model, data.dev + data.train, folder, context=AudioContext())
        data = StageData(data.train, data.dev, data.language, full, data.skipped, data.sot_prev)
    contexts = [AudioContext(mode="dynamic", margin=m, block=cfg.block) for m in cfg.margins()]
    caches = None
    if not cfg.train_encoder:
        caches = [cache_features_shared(model, data.train, folder, context=c) for c in contexts]
    dev = cache_features_shared(model, data.dev, folder, context=cfg.policy())
    return contexts, caches, data, StageData(data.train, data.dev, data.language, dev, data.skipped,
                                             data.sot_prev)


def teach_audio_context(student: Whisper, teacher: Whisper, data: StageData, cfg: AudioContextConfig,
                        out: Path, resume: bool = False, force: bool = False) -> TrainResult:
    """Train ``student`` in place to work at the short context; writes ``out`` with the policy."""
    contexts, caches, data, short = short_context_data(student, data, cfg)
    student.extra_config["audio_context"] = cfg.policy().to_dict()
    packs = training_packs(student, data.train, cfg.train.seed, cfg.pack_prob,
                           [data.features, *(caches or [])])
    batches = ShortContextBatcher(data.train, cfg.batch_size, cfg.train.seed, data.features,
                                  contexts, caches, student.dims.n_audio_ctx, cfg.timestamp_prob,
                                  packs=packs, pack_prob=cfg.pack_prob, prompt_prob=cfg.prompt_prob,
                                  sot_prev=data.sot_prev)
    trainer = Trainer(
        student, context_loss_fn(teacher, cfg), cfg.train, run_folder(out),
        trainable_filter=None if cfg.train_encoder else ["decoder."],
        evaluate_fn=dev_evaluator(short, cfg.eval_limit),
        save_best=model_saver(Path(out), {"stage": "audio-context", **cfg.policy().to_dict(),
                                          "jitter": cfg.jitter, "margins": cfg.margins(),
                                          "train_encoder": cfg.train_encoder,
                                          **cfg.train.to_dict()}, force),
        settings=stage_settings(cfg, data),
    )
    return trainer.train(batches, resume=resume)


def _train(student: Whisper, i: StageInputs, out: Path) -> TrainResult:
    teacher = i.models.get("context_teacher") or frozen_copy(student)
    teacher.freeze()
    return teach_audio_context(student, teacher, i.data, i.cfg.audio_context, out,
                               resume=i.resume, force=i.force)


STAGE = Stage(
    name="final-ctx", command="audio-context", config="audio_context",
    summary="Teach a model a short audio context (speech + margin instead of 30 s) by "
            "distilling it at full context into itself.",
    inputs=(ModelInput("final", "--model", "The model to teach: any model folder (the recipe's "
                       "final, a teacher, stock whisper-base)."),
            ModelInput("context_teacher", "--teacher", "The teacher at full context (default: "
                       "the model itself).", required=False)),
    student=lambda i: i.models["final"],
    train=_train,
)
