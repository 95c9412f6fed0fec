"""Windows without speech as training items, so a fine-tuned model keeps Whisper's silence.

Fine-tuning corpora hold only clips of speech, and a model trained on them learns that
every window holds some: on 10 s of silence the fine-tuned Hausa teacher wrote " Kai yi!".
Its no-speech probability was high (0.77), but openai's rule, which we keep, skips a window
only when the text is unlikely too (average log-probability under -1), and this text was
confident. Whisper's own training data has windows without speech; these items put them
back: noise at random low levels (and some digital silence) of random lengths, with an
empty transcript. Without timestamps that is eot right after the prompt; with timestamps,
whose rules force a timestamp first, ``<|0.00|>`` then eot, which the seeking loop reads as
"nothing in this window".

The windows are drawn once from a fixed seed, so every stage and every resumed run trains
on the same ones, and the feature cache encodes each once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..audio import N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim
from ..dataset import TokenizedExample

SILENCE_STREAM = 0x5153  # keeps these draws apart from the batches' and packs' streams
SECONDS = (1.0, 30.0)  # lengths of the windows' audio
LEVELS_DBFS = (-90.0, -40.0)  # RMS of the noise, in dB relative to full scale
ZERO_SHARE = 0.1  # windows of digital silence (exact zeros)


def silence_window_count(n_clips: int, share: float) -> int:
    """How many windows without speech ``share`` of ``n_clips`` clips makes (at least one
    when the share is positive)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"silence_share must be between 0 and 1, not {share}")
    return max(1, round(share * n_clips)) if share else 0


def silence_windows(like: TokenizedExample, timestamp_begin: int, count: int, n_mels: int
                    ) -> list[TokenizedExample]:
    """``count`` windows without speech, with the prompt (language, task) of ``like``.
    ``like`` is a prepared clip: its tokens start with the prompt ending in
    <|notimestamps|>, and its last token is eot."""
    rng = np.random.default_rng([SILENCE_STREAM, count])
    prompt = [int(t) for t in like.tokens[:like.prompt_length]]
    eot = int(like.tokens[-1])
    tokens = np.array(prompt + [eot], np.int32)
    stamped = np.array(prompt[:-1] + [timestamp_begin, eot], np.int32)
    out = []
    for k in range(count):
        seconds = float(rng.uniform(*SECONDS))
        n = int(round(seconds * SAMPLE_RATE))
        if rng.random() < ZERO_SHARE:
            audio = np.zeros(n, np.float32)
        else:
            rms = 10.0 ** (rng.uniform(*LEVELS_DBFS) / 20.0)
            audio = (rng.standard_normal(n) * rms).astype(np.float32)
        mel = np.asarray(log_mel_spectrogram(pad_or_trim(audio, N_SAMPLES), n_mels)).astype(like.mel.dtype)
        out.append(TokenizedExample(f"silence[{k}]", "", like.language, mel, tokens, like.prompt_length,
                                    n / SAMPLE_RATE, stamped))
    return out


def with_silence(items: Sequence[TokenizedExample], share: float, timestamp_begin: int,
                 n_mels: int) -> list[TokenizedExample]:
    """The training clips, then ``share`` as many windows without speech."""
    count = silence_window_count(len(items), share)
    if not count or not items:
        return list(items)
    return [*items, *silence_windows(items[0], timestamp_begin, count, n_mels)]
