"""Decoding one 30-second window per item: language detection, then a strategy's loop.

The decoder steps run in a decoding state from the backends (MLX, or numpy on Linux
CPU); the per-step logit rules (suppression, timestamp grammar) run in numpy on one
(batch, vocab) row, which is cheap next to the decoder step; the strategies
(strategies.py) choose the tokens.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from . import backends
from .audio import N_FRAMES
from .backends.cpu.ops import log_softmax
from .model import Whisper, padding_mask
from .strategies import BeamSearch, Candidates, Sampling, Strategy
from .tokenizer import Tokenizer, get_tokenizer, language_code

NEG_INF = -np.inf


@dataclass(frozen=True)
class DecodingOptions:
    task: str = "transcribe"
    language: Optional[str] = None
    temperature: float = 0.0
    sample_len: Optional[int] = None
    best_of: Optional[int] = None
    beam_size: Optional[int] = None
    patience: Optional[float] = None
    length_penalty: Optional[float] = None
    prompt: Optional[Union[str, list[int]]] = None
    prefix: Optional[Union[str, list[int]]] = None
    suppress_tokens: Optional[Union[str, Sequence[int]]] = "-1"
    suppress_blank: bool = True
    without_timestamps: bool = False
    max_initial_timestamp: Optional[float] = 1.0
    fp16: bool = False  # accepted for openai-whisper compatibility; use load_model(dtype=...)
    seed: Optional[int] = None


@dataclass
class DecodingResult:
    language: str
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    avg_logprob: float = float("nan")
    no_speech_prob: float = float("nan")
    temperature: float = float("nan")
    compression_ratio: float = float("nan")
    language_probs: Optional[dict[str, float]] = None


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def tokenizer_for(model: Whisper, language: Optional[str] = None, task: Optional[str] = None) -> Tokenizer:
    if model.tokenizer_dir is None:
        raise ValueError("this model has no tokenizer.json; save it with its tokenizer files")
    aliases = model.extra_config.get("language_tokens", {})
    return get_tokenizer(model.tokenizer_dir, model.is_multilingual, language, task, aliases)


def audio_padding(lengths: Optional[Sequence[int]], positions: int) -> Optional[mx.array]:
    """The cross-attention padding mask for windows of these lengths, or None when every
    window fills the ``positions`` (the batch was encoded at one length)."""
    if lengths is None or all(n >= positions for n in lengths):
        return None
    return padding_mask(mx.array([int(n) for n in lengths]), positions)  # numpy ints too


def detect_language(model: Whisper, audio_features: mx.array, tokenizer: Tokenizer,
                    audio_lengths: Optional[Sequence[int]] = None
                    ) -> tuple[list[str], list[dict[str, float]]]:
    """One decoder step on <|startoftranscript|>; the most likely language token wins."""
    n = audio_features.shape[0]
    pad = audio_padding(audio_lengths, audio_features.shape[1])
    logits = model.decoder(mx.array([[tokenizer.sot]] * n), audio_features,
                           audio_padding=pad)[0][:, 0]
    lang_ids = tokenizer.all_language_tokens
    sub = np.array(logits[:, mx.array(lang_ids)].astype(mx.float32))
    probs = np.exp(log_softmax(sub))
    codes = tokenizer.all_language_codes
    best = [codes[int(i)] for i in sub.argmax(-1)]
    return best, [dict(zip(codes, map(float, p))) for p in probs]


class LogitRules:
    """Suppression and the timestamp grammar, applied to a (batch, vocab) float array in place."""

    def __init__(self, tokenizer: Tokenizer, options: DecodingOptions, sample_begin: int,
                 n_vocab: int, max_initial_ts_index: Optional[int]):
        self.tk, self.sample_begin, self.n_vocab = tokenizer, sample_begin, n_vocab
        self.suppress_blank = options.suppress_blank
        self.blank = tokenizer.encode(" ") + [tokenizer.eot]
        self.suppress = self._suppress_list(options.suppress_tokens)
        self.timestamps = not options.without_timestamps
        self.max_initial_ts_index = max_initial_ts_index
        self.last_ts_index: Optional[np.ndarray] = None  # per sequence: the audio's end

    def _suppress_list(self, spec) -> list[int]:
        tk = self.tk
        if isinstance(spec, str):
            spec = [int(t) for t in spec.split(",") if t.strip()]
        ids = set(spec or [])
        if -1 in ids:
            ids.discard(-1)
            ids.update(tk.non_speech_tokens)
        ids.update([tk.transcribe, tk.translate, tk.sot, tk.sot_prev, tk.sot_lm])
        if tk.no_speech is not None:
            ids.add(tk.no_speech)
        return sorted(i for i in ids if 0 <= i < self.n_vocab)

    def apply(self, logits: np.ndarray, tokens: list[list[int]]) -> None:
        if self.suppress_blank and len(tokens[0]) == self.sample_begin:
            logits[:, self.blank] = NEG_INF
        logits[:, self.suppress] = NEG_INF
        if self.timestamps:
            self._timestamp_rules(logits, tokens)

    def _timestamp_rules(self, logits: np.ndarray, tokens: list[list[int]]) -> None:
        tb, eot = self.tk.timestamp_begin, self.tk.eot
        logits[:, self.tk.no_timestamps] = NEG_INF
        for k, seq_all in enumerate(tokens):
            seq = seq_all[self.sample_begin:]
            last_ts = len(seq) >= 1 and seq[-1] >= tb
            penult_ts = len(seq) < 2 or seq[-2] >= tb
            if last_ts:
                if penult_ts:  # a pair of timestamps closes a segment: text must follow
                    logits[k, tb:] = NEG_INF
                else:  # a lone timestamp must be followed by another or by end of text
                    logits[k, :eot] = NEG_INF
            stamps = [t for t in seq if t >= tb]
            if stamps:  # timestamps never go back in time
                floor = stamps[-1] if (last_ts and not penult_ts) else stamps[-1] + 1
                logits[k, tb:floor] = NEG_INF
        if self.last_ts_index is not None:  # no timestamp past the encoded audio
            for k, last in enumerate(self.last_ts_index):
                logits[k, tb + int(last) + 1:] = NEG_INF
        if len(tokens[0]) == self.sample_begin:
            logits[:, :tb] = NEG_INF  # the first token is a timestamp
            if self.max_initial_ts_index is not None:
                logits[:, tb + self.max_initial_ts_index + 1:] = NEG_INF
        logprobs = log_softmax(logits)
        for k in range(logits.shape[0]):
            ts_mass = np.logaddexp.reduce(logprobs[k, tb:])
            if ts_mass > logprobs[k, :tb].max():  # timestamps together beat any text token
                logits[k, :tb] = NEG_INF


class Decoder:
    """Decodes a batch of mel windows with one set of options."""

    def __init__(self, model: Whisper, options: DecodingOptions, tokenizer: Tokenizer,
                 prompts: Optional[list[list[int]]] = None):
        """``prompts``: per-item previous-text tokens (all of one length) for batched windows."""
        self.model, self.options, self.tk = model, options, tokenizer
        self.n_ctx = model.dims.n_text_ctx
        self.sample_len = options.sample_len or self.n_ctx // 2
        self.rng = np.random.default_rng(options.seed)
        if options.beam_size is not None and options.best_of is not None:
            raise ValueError("best_of with beam search is not supported")
        if options.temperature == 0 and options.best_of is not None:
            raise ValueError("best_of with greedy sampling (temperature 0) is not meaningful")
        if options.patience is not None and options.beam_size is None:
            raise ValueError("patience requires beam_size to be given")
        if options.task not in ("transcribe", "translate"):
            raise ValueError(f"task must be 'transcribe' or 'translate', got {options.task!r}")
        base = self._initial_tokens(options.prompt)
        self.item_tokens = [self._initial_tokens(p) for p in prompts] if prompts else None
        if self.item_tokens and len({len(t) for t in self.item_tokens}) != 1:
            raise ValueError("batched prompts must have the same length")
        self.initial_tokens = self.item_tokens[0] if self.item_tokens else base
        self.sample_begin = len(self.initial_tokens)
        self.sot_index = self.initial_tokens.index(tokenizer.sot)
        max_init = None
        if options.max_initial_timestamp:
            max_init = round(options.max_initial_timestamp / 0.02)
        self.rules = LogitRules(tokenizer, options, self.sample_begin, model.dims.n_vocab, max_init)

    def _as_tokens(self, text_or_ids) -> list[int]:
        if isinstance(text_or_ids, str):
            return self.tk.encode(" " + text_or_ids.strip())
        return list(text_or_ids)

    def _initial_tokens(self, prompt) -> list[int]:
        o, tk = self.options, self.tk
        tokens = list(tk.sot_sequence_including_notimestamps if o.without_timestamps else tk.sot_sequence)
        if o.prefix:
            prefix = self._as_tokens(o.prefix)
            tokens += prefix[-(self.n_ctx // 2 - self.sample_len):] if self.sample_len < self.n_ctx // 2 else prefix
        if prompt:
            prompt = self._as_tokens(prompt)
            tokens = [tk.sot_prev] + prompt[-(self.n_ctx // 2 - 1):] + tokens
        return tokens

    def run(self, audio_features: mx.array,
            audio_lengths: Optional[Sequence[int]] = None) -> list[DecodingResult]:
        """``audio_lengths``: each window's encoder positions when shorter than the
        features' (a short audio context); timestamps stop at each window's end."""
        o, tk = self.options, self.tk
        n_audio, positions = audio_features.shape[:2]
        group = o.beam_size or o.best_of or 1
        lengths = list(audio_lengths) if audio_lengths is not None else [positions] * n_audio
        lengths = [n for n in lengths for _ in range(group)]
        if group > 1:
            audio_features = mx.repeat(audio_features, group, axis=0)
        if positions < self.model.dims.n_audio_ctx or audio_lengths is not None:
            self.rules.last_ts_index = np.array(lengths)
        starts = self.item_tokens or [self.initial_tokens] * n_audio
        tokens = [list(starts[i]) for i in range(n_audio) for _ in range(group)]
        pad = audio_padding(lengths, positions)
        with backends.decoding(self.model, len(tokens), pad) as inference:
            strategy: Strategy
            if o.beam_size:
                strategy = BeamSearch(o.beam_size, tk.eot, n_audio, self.sample_begin,
                                      inference.reorder, o.patience)
            else:
                strategy = Sampling(o.temperature, tk.eot, n_audio, group, self.sample_begin,
                                    self.rng)
            finished, no_speech = self._loop(inference, audio_features, tokens, strategy)
        results = []
        for i in range(n_audio):
            toks, logprob = max(finished[i], key=lambda c: self._score(c[0], c[1]))
            text = tk.decode(toks).strip()
            results.append(DecodingResult(
                language=tk.language, tokens=toks, text=text,
                avg_logprob=logprob / (len(toks) + 1), no_speech_prob=no_speech[i * group],
                temperature=o.temperature, compression_ratio=compression_ratio(text)))
        return results

    def _score(self, toks: list[int], logprob: float) -> float:
        lp = self.options.length_penalty
        n = len(toks)
        penalty = n if lp is None else ((5 + n) / 6) ** lp
        return logprob / max(penalty, 1e-9)

    def _loop(self, inference: backends.Inference, audio_features: mx.array,
              tokens: list[list[int]], strategy: Strategy) -> tuple[list[Candidates], np.ndarray]:
        """Step until the strategy is done or the context is full; returns its candidates
        and each sequence's no-speech probability (from the first step)."""
        no_speech = None
        for i in range(self.sample_len):
            logits, ns = self._step(inference, audio_features, tokens, first=i == 0)
            if ns is not None:
                no_speech = ns
            tokens, done = strategy.update(tokens, logits)
            if done or len(tokens[0]) >= self.n_ctx:
                break
        return strategy.finalize(tokens), no_speech

    def _step(self, inference: backends.Inference, audio_features: mx.array,
              tokens: list[list[int]], first: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Logits (numpy, float32) for the next token of each sequence, after the rules, and
        at the first step (the whole prompt) the no-speech probabilities."""
        inp = mx.array(tokens) if first else mx.array([[t[-1]] for t in tokens])
        logits = inference.logits(inp, audio_features)
        no_speech = None
        if first:
            ns = logits[:, self.sot_index].astype(mx.float32)
            ns = mx.softmax(ns, axis=-1)[:, self.tk.no_speech] if self.tk.no_speech is not None else None
            no_speech = np.array(ns) if ns is not None else np.full(len(tokens), np.nan)
        last = np.array(logits[:, -1].astype(mx.float32))
        self.rules.apply(last, tokens)
        return last, no_speech


def decode(model: Whisper, mel: mx.array, options: DecodingOptions = DecodingOptions(),
           tokenizer: Optional[Tokenizer] = None) -> Union[DecodingResult, list[DecodingResult]]:
    """Decode one mel window (frames, n_mels) or a batch (batch, frames, n_mels)."""
    single = mel.ndim == 2
    if single:
        mel = mel[None]
    if mel.shape[1] != N_FRAMES:
        raise ValueError(f"decode() expects {N_FRAMES}-frame windows, got {mel.shape[1]}")
    audio_features = model.embed_audio(mel.astype(model.dtype))
    results = decode_features(model, audio_features, options, tokenizer)
    return results[0] if single else results


def decode_features(model: Whisper, audio_features: mx.array, options: DecodingOptions,
                    tokenizer: Optional[Tokenizer] = None,
                    prompts: Optional[list[list[int]]] = None,
                    audio_lengths: Optional[Sequence[int]] = None) -> list[DecodingResult]:
    """Decode encoded windows; items are grouped by language and prompt length, and each
    group runs as one batch. ``audio_lengths``: each window's encoder positions, when
    windows of a short audio context were padded to one length (see model.padding_mask)."""
    language = language_code(options.language, model.extra_config.get("language_tokens"))
    tk = tokenizer or tokenizer_for(model, language or "en", options.task)
    probs = None
    if model.is_multilingual and language is None:
        langs, probs = detect_language(model, audio_features, tk, audio_lengths)
    else:
        langs = [language or tk.language or "en"] * audio_features.shape[0]
    results: list[Optional[DecodingResult]] = [None] * len(langs)
    keys = [(l, len(prompts[i]) if prompts else 0) for i, l in enumerate(langs)]
    for key in dict.fromkeys(keys):
        idx = [i for i, k in enumerate(keys) if k == key]
        lang = key[0]
        tk_l = replace(tk, language=lang, task=options.task if model.is_multilingual else None)
        group_prompts = [prompts[i] for i in idx] if prompts else None
        dec = Decoder(model, replace(options, language=lang), tk_l, group_prompts)
        feats = audio_features if len(idx) == len(langs) else audio_features[mx.array(idx)]
        lengths = None
        if audio_lengths is not None:
            lengths = [audio_lengths[i] for i in idx]
            feats = feats[:, :max(lengths)]  # no group pays for a longer window's padding
        for i, r in zip(idx, dec.run(feats, lengths)):
            r.language_probs = probs[i] if probs else None
            results[i] = r
    return results  # type: ignore[return-value]


def decode_with_fallback(model: Whisper, features: mx.array, languages: Sequence[str],
                         prompts: Optional[Sequence[list[int]]], options: DecodingOptions,
                         temperatures: Sequence[float], cr_threshold: Optional[float],
                         lp_threshold: Optional[float], ns_threshold: Optional[float],
                         audio_lengths: Optional[Sequence[int]] = None) -> list[DecodingResult]:
    """openai-whisper's temperature fallback over a batch of windows: decode all at the first
    temperature, then re-decode hotter only those that failed (too repetitive, or too unsure
    unless judged silent). ``languages``/``prompts``/``audio_lengths`` are per window."""
    results: list[Optional[DecodingResult]] = [None] * len(languages)
    pending = list(range(len(languages)))
    for t in temperatures:
        kw: dict = {"temperature": t}
        kw.update({"beam_size": None, "patience": None} if t > 0 else {"best_of": None})
        failed = []
        for lang in dict.fromkeys(languages[i] for i in pending):
            idx = [i for i in pending if languages[i] == lang]
            feats = features if len(idx) == features.shape[0] else features[mx.array(idx)]
            out = decode_features(model, feats, replace(options, language=lang, **kw),
                                  tokenizer_for(model, lang, options.task),
                                  [prompts[i] for i in idx] if prompts else None,
                                  None if audio_lengths is None else [audio_lengths[i] for i in idx])
            for i, r in zip(idx, out):
                results[i] = r
                repetitive = cr_threshold is not None and r.compression_ratio > cr_threshold
                unsure = lp_threshold is not None and r.avg_logprob < lp_threshold
                silent = ns_threshold is not None and r.no_speech_prob > ns_threshold
                if (repetitive or unsure) and not (silent and unsure):
                    failed.append(i)
        pending = failed
        if not pending:
            break
    return results  # type: ignore[return-value]
