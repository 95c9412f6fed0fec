"""What every training stage shares: prepared data, cached encoder features, the
dev-set evaluation, and writing the stage's model folder.

All BaldWhisper stages change only the decoder (the encoder is frozen by default),
so the encoder runs once per clip for the whole recipe and its outputs are cached.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

from .. import backends
from ..diskspace import replace_file, size_text
from ..decoding import audio_padding as decoding_padding, tokenizer_for
from ..evaluate import error_rates, evaluate
from ..audio_context import AudioContext, of_model
from ..model import Whisper
from ..weights import mlx_folder
from ..dataset import TokenizedExample, prepare, read_manifest
from ..features import FeatureCache, encoder_fingerprint
from . import distributed
from .data import Batcher
from .losses import cross_entropy
from .packing import PackedWindow, packed_windows
from .silence import with_silence

log = logging.getLogger("mlx_baldwhisper")


@dataclass
class StageData:
    train: list[TokenizedExample]
    dev: list[TokenizedExample]
    language: str
    features: Optional[FeatureCache]  # None when the encoder is trained
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sot_prev: Optional[int] = None  # <|startofprev|>, for items conditioned on previous text

    def batches(self, batch_size: int, seed: int, fraction: float = 1.0,
                timestamp_prob: float = 0.0, pack_prob: float = 0.0,
                model: Optional[Whisper] = None, prompt_prob: float = 0.0,
                alternates: Optional[Sequence[Optional[TokenizedExample]]] = None,
                alternate_prob: float = 0.0) -> Batcher:
        """Training batches; ``timestamp_prob`` of the clips with timestamped targets,
        ``pack_prob`` of the packed windows (encoded by ``model`` into the cache) as windows,
        ``prompt_prob`` of the items conditioned on the previous clip's text, and
        ``alternate_prob`` of the clips trained on their ``alternates`` entry when it has one."""
        n = max(1, int(len(self.train) * fraction))
        items = self.train[:n]
        packs = training_packs(model, items, seed, pack_prob, [self.features])
        return Batcher(items, batch_size, seed=seed, features=self.features,
                       include_mel=self.features is None, timestamp_prob=timestamp_prob,
                       packs=packs, pack_prob=pack_prob, prompt_prob=prompt_prob,
                       sot_prev=self.sot_prev, alternates=None if alternates is None else alternates[:n],
                       alternate_prob=alternate_prob)


def training_packs(model: Optional[Whisper], items: Sequence[TokenizedExample], seed: int,
                   pack_prob: float, caches: Sequence[Optional[FeatureCache]]) -> list[PackedWindow]:
    """The packed windows of ``seed``'s fixed plan (none when ``pack_prob`` is 0), encoded
    by ``model`` into each cache. The caches must hold this encoder's features: a pack
    encoded by another encoder than its clips would be a silent mismatch."""
    if not pack_prob:
        return []
    packs = packed_windows(items, seed)
    caches = [c for c in caches if c is not None]
    if packs and caches:
        if model is None:
            raise ValueError("packed windows with cached features need the model that encodes them")
        own = encoder_fingerprint(model)
        for cache in caches:
            if cache.encoder_id != own:
                raise ValueError("the feature cache holds another encoder's features: packed "
                                 "windows must be encoded by the encoder that cached the clips")
            fill_cache(model, cache, packs)
    if distributed.is_main():
        clips = sum(len(p.pack.members) for p in packs if p.pack is not None)
        cut = sum(p.pack is not None and p.pack.cut_off is not None for p in packs)
        log.info("packed %d of %d clips into %d windows (%d cut off at 30 s); pack_prob %g",
                 clips, len(items), len(packs), cut, pack_prob)
    return packs


def load_data(model: Whisper, train: str, dev: str, language: str, cache_dir: Optional[str],
              cache_features: bool = True, max_tokens: Optional[int] = None,
              clear_cache: bool = False, silence_share: float = 0.0) -> StageData:
    """Read and prepare both manifests, add ``silence_share`` as many windows without
    speech to the training clips (silence.py), and cache encoder outputs unless the encoder
    trains (``clear_cache`` empties the cache folder first)."""
    tk = tokenizer_for(model, language)
    limit = max_tokens or model.dims.n_text_ctx // 2
    skipped: list[tuple[str, str]] = []
    sets = []
    for path in (train, dev):
        items, sk = prepare(read_manifest(path, language=language), tk, model.dims.n_mels,
                            max_tokens=limit, progress=distributed.is_main())
        skipped += sk
        sets.append(items)
    if not sets[0] or not sets[1]:
        raise ValueError(f"no usable clips in {train if not sets[0] else dev} "
                         f"({len(skipped)} skipped; see the warnings above)")
    sets[0] = with_silence(sets[0], silence_share, tk.timestamp_begin, model.dims.n_mels)
    features = None
    if cache_features:  # over the model's audio context: a short one trains on short features
        features = cache_features_shared(model, sets[1] + sets[0], cache_dir, clear_cache,
                                         context=of_model(model))
    return StageData(sets[0], sets[1], language, features, skipped, tk.sot_prev)


def cache_features_shared(model: Whisper, items: list[TokenizedExample],
                          cache_dir: Optional[str], clear: bool = False,
                          context: Optional[AudioContext] = None) -> FeatureCache:
    """Encoder outputs of every clip (over ``context``, default full 30-s windows).
    Several processes split the encoding: each writes its share to ``cache_dir``, a folder
    all of them read (on several hosts, a shared folder at the same path), so afterwards
    each one loads the rest from disk. Rank 0 reports the cache's size, and empties it
    first when asked."""
    features = FeatureCache(encoder_fingerprint(model), cache_dir, keep_in_memory=True,
                            context=context)
    rank = distributed.rank()
    if clear:
        if rank == 0:
            n, freed = features.clear()
            print(f"cleared the feature cache {cache_dir}: {n} entries, {size_text(freed)}",
                  file=sys.stderr)
        distributed.barrier()
    fill_cache(model, features, items)
    if rank == 0:
        print(features.size_report(), file=sys.stderr)
    return features


def fill_cache(model: Whisper, features: FeatureCache, items: Sequence[Any]) -> None:
    """Encode the items ``features`` lacks; several processes split them (each its share,
    then what it cannot see in the cache folder)."""
    rank, size = distributed.rank(), distributed.size()
    if size > 1:
        features.compute(model, items[rank::size], batch_size=4, progress=rank == 0)
        distributed.barrier()
        missing = sum(x not in features for x in items)
        if missing:
            log.warning("rank %d does not see %d clips the other ranks cached in %s: encoding them "
                        "here too (share the cache folder to avoid this)", rank, missing,
                        features.directory)
    features.compute(model, items, batch_size=4, progress=rank == 0)


def decoder_input(model: Whisper, batch: dict) -> mx.array:
    if "features" in batch:
        return mx.array(batch["features"]).astype(model.dtype)
    return model.embed_audio(mx.array(batch["mel"]).astype(model.dtype))


def audio_padding(batch: dict) -> Optional[mx.array]:
    """Cross-attention mask for a batch of clips encoded over different audio contexts."""
    lengths = batch.get("audio_lengths")
    return None if lengths is None else decoding_padding(lengths, batch["features"].shape[1])


@dataclass(frozen=True)
class Scored:
    """The target positions a loss scores: ``rows`` (flat indices into batch × time, or
    None for every position), and the targets and mask there, shaped as the logits
    ``TextDecoder.project`` gives for those rows."""
    rows: Optional[mx.array]
    targets: mx.array
    mask: mx.array


def scored(batch: dict) -> Scored:
    """Only the positions under the mask: a prompted item has ~30 targets after up to 224
    prompt tokens, and its batch-mates are padded to that length, so projecting every
    position onto the vocabulary would be most of the step. Inside ``mx.compile`` the
    mask cannot be read, so every position is scored (same loss, more work)."""
    mask = batch["mask"]
    if not isinstance(mask, np.ndarray):
        return Scored(None, mx.array(batch["targets"]), mx.array(mask))
    rows = np.flatnonzero(mask.reshape(-1))
    return Scored(mx.array(rows.astype(np.int32)),
                  mx.array(np.asarray(batch["targets"]).reshape(-1)[rows][None]),
                  mx.array(mask.reshape(-1)[rows][None]))


def teacher_logits(teacher: Whisper, inputs: mx.array, features: mx.array,
                   padding: Optional[mx.array] = None, rows: Optional[mx.array] = None) -> mx.array:
    """The frozen teacher's logits (at ``rows``, see ``TextDecoder.project``). Never
    differentiated, so the numpy inference kernels (``backends``) may serve its attention
    and GELU on Linux CPU."""
    with backends.inference():
        hidden = teacher.decoder(inputs, features.astype(teacher.dtype), audio_padding=padding,
                                 return_hidden=True)[0]
        logits = teacher.decoder.project(hidden, rows)
    return mx.stop_gradient(logits)


def ce_loss(model: Whisper, batch: dict) -> tuple[mx.array, dict[str, mx.array]]:
    at = scored(batch)
    hidden = model.decoder(mx.array(batch["inputs"]), decoder_input(model, batch),
                           audio_padding=audio_padding(batch), return_hidden=True)[0]
    ce = cross_entropy(model.decoder.project(hidden, at.rows), at.targets, at.mask)
    return ce, {"ce": ce}


def dev_evaluator(data: StageData, limit: Optional[int] = None,
                  batch_size: int = 16) -> Callable[[Whisper], dict[str, float]]:
    """With several processes each scores its share of the clips, and the edit counts add up."""
    def run(model: Whisper) -> dict[str, float]:
        items = data.dev[:limit][distributed.rank()::distributed.size()]
        r = evaluate(model, items, language=data.language, batch_size=batch_size,
                     features=data.features, progress=distributed.is_main())
        keys = sorted(r["counts"])
        totals = distributed.sum_floats([float(r["counts"][k]) for k in keys])
        return error_rates(dict(zip(keys, totals)))
    return run


def model_saver(folder: Path, record: dict[str, Any],
                force: bool = False) -> Callable[[Whisper, Path], None]:
    """A ``save_best`` for the Trainer: writes a complete model folder atomically."""
    def save(model: Whisper, _ignored: Path) -> None:
        save_model_folder(model, folder, record, force=force)
    return save


def stage_settings(cfg: Any, data: StageData, **more: Any) -> dict[str, Any]:
    """What defines a stage's run besides its TrainConfig (checked when it resumes)."""
    own = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "train"}
    return {**own, "language": data.language, "train_clips": len(data.train),
            "dev_clips": len(data.dev), **more}


# How a model trained here transcribes long recordings by default, written into its
# config.json (transcribe's resume_early_end and condition_on_previous_text): fine-tuned
# and compressed models end windows early over speech, and a prompt of the text before
# makes the compressed ones skip speech. Measured on Hausa 3-min recordings (WER, clips in
# brackets; benchmarks/RESULTS.md, session 8): teacher 46.90 -> 46.52 (46.52), merged
# 79.39 -> 53.48 (49.87), final 61.63 -> 51.01 (46.71). A folder that already says
# otherwise keeps its settings; transcribe's arguments override them.
TRAINED_LONG_FORM = {"resume_early_end": True, "condition_on_previous_text": False}


def save_model_folder(model: Whisper, folder: Path, record: Optional[dict[str, Any]] = None,
                      force: bool = False) -> None:
    """Save with a training record appended to the config (the model itself is unchanged).
    A trained model counts as recovered from any surgery it carries."""
    extra = dict(model.extra_config)
    if record:
        extra["training"] = list(extra.get("training", [])) + [record]
        extra["long_form"] = {**TRAINED_LONG_FORM, **extra.get("long_form", {})}
        if "surgery" in extra:
            extra["surgery"] = {**extra["surgery"], "recovered": True}
    saved, model.extra_config = model.extra_config, extra
    try:
        mlx_folder.save_atomic(model, Path(folder), model.tokenizer_dir, model.source, force=force)
    finally:
        model.extra_config = saved


def model_copy(model: Whisper) -> Whisper:
    """The same weights in a model of its own: MLX arrays are immutable and training gives
    the trained model new arrays, so the original stays as it was (and costs no memory
    until then)."""
    copy = Whisper(model.dims, model.alignment_heads)
    copy.update(model.parameters())
    copy.extra_config, copy.source = dict(model.extra_config), model.source
    copy.tokenizer_dir = model.tokenizer_dir
    return copy


def write_json(path: Path, data: Any) -> None:
    """Replace ``path`` whole (a killed process leaves the old or the new file); a full
    disk is a DiskFullError naming it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, json.dumps(data, indent=2, default=str))
