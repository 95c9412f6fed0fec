"""BaldWhisper stage 2: distil the sheared (low-rank) tied embedding.

The student's embedding E ≈ A·B starts from a truncated SVD (see ``lowrank.py``); by
default one weighted by token frequency in the training text, which keeps the rows the
language uses (measured on Hausa: teacher-forced dev CE right after factoring at rank 96
was 2.0 nats, against 6.0 for the plain SVD and 1.06 for the unfactored model).
Training adds, to the label CE (and optionally the teacher KL), two feature
distances against the teacher's full embedding E_t:
  * input side:  E_t[tokens]  vs  A[tokens]·B
  * output side: h·E_tᵀ       vs  (h·Bᵀ)·Aᵀ   on the student's final hidden states h
where distance(a, b) = mean|a − b| − mean log σ(cos(a, b)).
``hidden_weight`` adds recovery's intermediate-layer distillation (recover.py): each layer's
output stays near the teacher's after the last layer of its merge group, so the decoder
does not drift while the embedding changes under it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import click
import mlx.core as mx
import numpy as np

from .. import backends
from ..decoding import tokenizer_for
from ..folders import run_folder
from ..model import Whisper, gather_rows
from ..surgery import Surgery, compress
from .common import (StageData, audio_padding, decoder_input, dev_evaluator, model_saver, stage_settings,
                     teacher_logits, scored)
from .data import PACK_PROB, PROMPT_PROB, TIMESTAMP_PROB
from .losses import LearnableTemperature, feature_distance, hidden_state_mse, kl_term, masked_mean, token_losses
from .recover import teacher_layers
from .stage import ModelInput, Stage
from .trainer import TrainConfig, Trainer, TrainResult

log = logging.getLogger("mlx_baldwhisper")


@dataclass
class ShearConfig:
    rank: int = 96
    # The best checkpoint by dev WER is the stage's model: scored every 75 steps (of 300).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, warmup_steps=20, max_steps=300,
                                                                   eval_every=75))
    batch_size: int = 8
    ce_weight: float = 1.0
    kl_weight: float = 1.0  # our addition to the paper's loss: the teacher's soft labels
    input_feature_weight: float = 1.0
    output_feature_weight: float = 1.0
    temperature: float = 2.0
    trainable: tuple[str, ...] = ("decoder.",)  # the factors A, B and the decoder layers
    eval_limit: Optional[int] = 100
    # Initialisation of A·B: "svd" (the paper: plain truncated SVD) or "frequency" (SVD
    # weighted by each token's frequency in the training transcripts, mixed with a
    # uniform share ``uniform_mix`` so unseen tokens keep some weight).
    init: str = "frequency"
    uniform_mix: float = 0.1
    # Keep the special and timestamp tokens' rows (ids from end-of-text on) exact, outside
    # the factors: long-form seeking rests on them (lowrank.py). False: the paper's A·B for all.
    exact_special: bool = True
    # Share of clips trained on timestamped targets (one segment <|0.00|> text <|end|>),
    # the rest on text alone: keeps the timestamps long-form transcription relies on.
    timestamp_prob: float = TIMESTAMP_PROB
    # Share of the packed windows (consecutive clips joined into <= 30-s windows with a
    # timestamped segment each, packing.py) trained as windows, drawn per pack and epoch.
    pack_prob: float = PACK_PROB
    # Share of items conditioned on the previous clip's text (<|startofprev|>), as
    # transcribe() conditions each window on the text before it.
    prompt_prob: float = PROMPT_PROB
    # Intermediate-layer distillation, as recover.hidden_weight: weight of the MSE between
    # each decoder layer's output and the teacher's mapped layer (0: off).
    hidden_weight: float = 0.1


def token_frequencies(data: StageData, n_vocab: int, uniform_mix: float,
                      timestamp_prob: float = 0.0, timestamp_begin: Optional[int] = None) -> np.ndarray:
    """Weights for :func:`lowrank.factorize`: how often each token is fed to the decoder in
    the training set (prompt tokens included), as a distribution mixed with uniform.

    A share ``timestamp_prob`` of the clips counts with its timestamped targets. Their
    timestamp tokens' weight is spread evenly over every timestamp token (from
    ``timestamp_begin``): long-form windows use all of 0-30 s, while clips show only
    <|0.00|> and their ends."""
    counts = np.zeros(n_vocab, dtype=np.float64)
    for item in data.train:
        stamped = item.timestamp_tokens if timestamp_prob else None
        share = timestamp_prob if stamped is not None else 0.0
        np.add.at(counts, np.asarray(item.tokens, dtype=np.int64), 1.0 - share)
        if stamped is not None:
            np.add.at(counts, np.asarray(stamped, dtype=np.int64), share)
    if timestamp_begin is not None and timestamp_prob:
        counts[timestamp_begin:] = counts[timestamp_begin:].sum() / max(1, n_vocab - timestamp_begin)
    if counts.sum() == 0:
        return np.full(n_vocab, 1.0 / n_vocab)
    return (1.0 - uniform_mix) * counts / counts.sum() + uniform_mix / n_vocab


def sheared_student(merged: Whisper, data: StageData, cfg: ShearConfig) -> Whisper:
    """The merged model with its embedding factored at ``cfg.rank`` (``cfg.init``); a model
    already factored (``convert.py --rank``) is taken as it is."""
    if merged.dims.embedding_rank:
        if merged.dims.embedding_rank != cfg.rank:
            log.warning("the student is already factored at rank %d: training at that rank, "
                        "not %d", merged.dims.embedding_rank, cfg.rank)
            cfg.rank = merged.dims.embedding_rank
        return merged
    if cfg.init not in ("svd", "frequency"):
        raise ValueError(f"shear init must be 'svd' or 'frequency', not {cfg.init!r}")
    tokenizer = tokenizer_for(merged)
    weights = (token_frequencies(data, merged.dims.n_vocab, cfg.uniform_mix, cfg.timestamp_prob,
                                 tokenizer.timestamp_begin)
               if cfg.init == "frequency" else None)
    exact = merged.dims.n_vocab - tokenizer.eot if cfg.exact_special else 0
    return compress(merged, Surgery(rank=cfg.rank, token_weights=weights, exact_rows=exact))


def shear_loss_fn(teacher: Whisper, temperature: LearnableTemperature, cfg: ShearConfig,
                  layers: Optional[list[int]] = None):
    """``layers``: the teacher layer each student layer matches for ``cfg.hidden_weight``
    (default: the same index)."""
    E_t = mx.stop_gradient(teacher.decoder.token_embedding.weight)

    def loss_fn(student: Whisper, batch: dict):
        feats = decoder_input(student, batch)
        inputs, mask = mx.array(batch["inputs"]), mx.array(batch["mask"])
        emb = student.decoder.token_embedding
        pad, at = audio_padding(batch), scored(batch)
        t_logits, hidden_mse = None, None
        if cfg.hidden_weight:
            states = student.decoder.block_states(inputs, feats, pad)
            hidden = gather_rows(student.decoder.ln(states[-1]), at.rows)
            with backends.inference():
                t_states, t_logits = teacher.decoder.layer_states(inputs, feats.astype(teacher.dtype), pad,
                                                                  at.rows)
            t_logits = mx.stop_gradient(t_logits)
            hidden_mse = hidden_state_mse(states, [mx.stop_gradient(t_states[i])
                                                   for i in (layers or range(len(states)))], mask)
        else:
            hidden = gather_rows(student.decoder(inputs, feats, return_hidden=True, audio_padding=pad)[0],
                                 at.rows)
            if cfg.kl_weight:
                t_logits = teacher_logits(teacher, inputs, feats, pad, at.rows)
        logits = emb.as_linear(hidden)
        t = temperature()
        ce_rows, kl_rows = token_losses(logits, at.targets, t_logits if cfg.kl_weight else None, t)
        ce = masked_mean(ce_rows, at.mask)
        feat_in = feature_distance(emb(inputs), E_t[inputs])
        feat_out = feature_distance(logits, hidden @ E_t.T)
        loss = cfg.ce_weight * ce + cfg.input_feature_weight * feat_in + cfg.output_feature_weight * feat_out
        logs = {"ce": ce, "feat_in": feat_in, "feat_out": feat_out}
        if hidden_mse is not None:
            loss = loss + cfg.hidden_weight * hidden_mse
            logs["hidden"] = hidden_mse
        if kl_rows is not None:
            kl = kl_term(kl_rows, at.mask, t)
            loss = loss + cfg.kl_weight * kl
            logs.update(kl=kl, temperature=mx.stop_gradient(t))
        return loss, logs
    return loss_fn


def shear(student: Whisper, teacher: Whisper, data: StageData, cfg: ShearConfig, out: Path,
          resume: bool = False, force: bool = False) -> TrainResult:
    """``student`` already carries the SVD-initialised low-rank embedding."""
    if not student.dims.embedding_rank:
        raise ValueError("the shear stage needs a student with a low-rank embedding (rank > 0)")
    teacher.freeze()
    temperature = LearnableTemperature(cfg.temperature)
    trainer = Trainer(
        student, shear_loss_fn(teacher, temperature, cfg, teacher_layers(student)), cfg.train, run_folder(out),
        trainable_filter=list(cfg.trainable), extra_modules={"temperature": temperature},
        evaluate_fn=dev_evaluator(data, cfg.eval_limit),
        save_best=model_saver(Path(out), {"stage": "shear", "rank": cfg.rank,
                                          "ce_weight": cfg.ce_weight, "kl_weight": cfg.kl_weight,
                                          "input_feature_weight": cfg.input_feature_weight,
                                          "output_feature_weight": cfg.output_feature_weight,
                                          "init": cfg.init, "uniform_mix": cfg.uniform_mix,
                                          "exact_special": cfg.exact_special, "hidden_weight": cfg.hidden_weight,
                                          **cfg.train.to_dict()}, force),
        settings=stage_settings(cfg, data),
    )
    return trainer.train(data.batches(cfg.batch_size, cfg.train.seed, timestamp_prob=cfg.timestamp_prob,
                                      pack_prob=cfg.pack_prob, model=student, prompt_prob=cfg.prompt_prob), resume=resume)


def _configure(cfg, rank: Optional[int] = None) -> None:
    cfg.shear.rank = rank or cfg.shear.rank


STAGE = Stage(
    name="final", command="shear", config="shear",
    summary="Low-rank embedding by (frequency-weighted) SVD, then feature distillation against the teacher.",
    inputs=(ModelInput("teacher", "--teacher", "The fine-tuned (uncompressed) model folder."),
            ModelInput("merged", "--student", "The recovered merged model folder (or one already "
                                              "factored by convert.py --rank).")),
    student=lambda i: sheared_student(i.models["merged"], i.data, i.cfg.shear),
    train=lambda s, i, out: shear(s, i.models["teacher"], i.data, i.cfg.shear, out,
                                  resume=i.resume, force=i.force),
    options=(click.option("--rank", type=click.IntRange(min=1), default=None,
                          help="Embedding rank (default: the config's, 96; a factored student's own)."),),
    configure=_configure,
    record=lambda i: {"rank": i.cfg.shear.rank, "init": i.cfg.shear.init},
)
