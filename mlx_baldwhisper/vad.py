"""Energy voice-activity detection: where a recording can be cut without cutting speech.

``transcribe(..., chunking="vad")`` cuts a long recording into chunks of at most 30 s at
silences and decodes the chunks independently, so it needs no timestamp tokens (a model
fine-tuned without them still transcribes long files). Frame energy is enough for that
job: we only need pauses between phrases, not a speech/noise classifier.

The thresholds (all in :class:`VadOptions`):

* ``frame_seconds`` (0.02): analysis frame, the length of one Whisper timestamp step.
  A frame's energy is its mean square in dB relative to full scale (dBFS).
* ``relative_db`` (-35): a frame is speech when it is louder than the file's level (the
  95th percentile of its frame energies) plus this, so the threshold follows the
  recording's gain; ...
* ``noise_margin_db`` (6): ... but at least this far above the file's noise floor (the
  10th percentile), as long as that stays this far below the level, so that a noisy
  recording (SNR < 35 dB) still has pauses. A recording as loud throughout as it is
  at its loudest (one long tone) is all speech.
* ``floor_db`` (-70): frames quieter than this are silence whatever the file's level
  (digital silence, a muted channel).
* ``min_silence_seconds`` (0.3): shorter pauses count as speech: gaps between words are
  shorter, pauses between phrases and sentences longer.
* ``min_speech_seconds`` (0.1): shorter bursts (clicks) count as silence.
* ``pad_seconds`` (0.2): kept around each speech region so that soft onsets and endings
  (below the threshold) stay in; between regions closer than twice this, the cut goes
  in the middle of the pause.
* ``max_chunk_seconds`` (30): Whisper's window. Regions are merged into chunks up to
  this length; a region longer than it is cut at its quietest frame in the second half
  of the allowed span.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio import SAMPLE_RATE


@dataclass(frozen=True)
class VadOptions:
    """The VAD's thresholds; see the module docstring for why each has its value."""

    frame_seconds: float = 0.02
    relative_db: float = -35.0
    noise_margin_db: float = 6.0
    floor_db: float = -70.0
    min_silence_seconds: float = 0.3
    min_speech_seconds: float = 0.1
    pad_seconds: float = 0.2
    max_chunk_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.frame_seconds <= 0 or self.max_chunk_seconds < 2 * self.frame_seconds:
            raise ValueError(f"need 0 < frame_seconds <= max_chunk_seconds / 2, got "
                             f"{self.frame_seconds} and {self.max_chunk_seconds}")
        if min(self.min_silence_seconds, self.min_speech_seconds, self.pad_seconds) < 0:
            raise ValueError("min_silence_seconds, min_speech_seconds and pad_seconds cannot be negative")


def vad_options(parameters: "VadOptions | dict | None") -> VadOptions:
    """``transcribe()``'s ``vad_parameters``: the defaults, a ``VadOptions``, or a dict of
    its fields (a clear error names an unknown one)."""
    if parameters is None:
        return VadOptions()
    if isinstance(parameters, VadOptions):
        return parameters
    if not isinstance(parameters, dict):
        raise TypeError(f"vad_parameters must be a dict or VadOptions, not {type(parameters).__name__}")
    known = set(VadOptions.__dataclass_fields__)
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise ValueError(f"unknown vad_parameters {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return VadOptions(**{k: float(v) for k, v in parameters.items()})


Span = tuple[int, int]  # [start, end) in samples


BLOCK_FRAMES = 1 << 14  # frames squared at a time: memory stays small on hours of audio


def frame_energy_db(samples: np.ndarray, frame: int) -> np.ndarray:
    """Mean-square energy of each ``frame``-sample frame in dBFS (the last one may be short)."""
    x = np.asarray(samples).reshape(-1)
    full, rest = divmod(x.shape[0], frame)
    power = np.empty(full + (1 if rest else 0))
    for i in range(0, full, BLOCK_FRAMES):
        k = min(BLOCK_FRAMES, full - i)
        block = x[i * frame:(i + k) * frame].astype(np.float64).reshape(k, frame)
        power[i:i + k] = (block * block).mean(axis=1)
    if rest:
        power[-1] = np.mean(x[full * frame:].astype(np.float64) ** 2)
    return 10 * np.log10(power + 1e-10)


def speech_threshold_db(db: np.ndarray, opts: VadOptions) -> float:
    """The energy above which a frame is speech (see the module docstring)."""
    level, noise = np.percentile(db, 95), np.percentile(db, 10)
    adaptive = max(level + opts.relative_db, min(noise + opts.noise_margin_db, level - opts.noise_margin_db))
    return max(adaptive, opts.floor_db)


def _runs(mask: np.ndarray) -> list[tuple[bool, int, int]]:
    """(value, start, end) of each run of equal values."""
    if mask.size == 0:
        return []
    edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), mask.size]
    return [(bool(mask[a]), a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def speech_frames(samples: np.ndarray, opts: VadOptions = VadOptions()) -> np.ndarray:
    """Per frame, True where there is speech, after filling short pauses and dropping clicks."""
    frame = max(1, round(opts.frame_seconds * SAMPLE_RATE))
    db = frame_energy_db(samples, frame)
    if db.size == 0:
        return np.zeros(0, bool)
    speech = db > speech_threshold_db(db, opts)
    min_silence = round(opts.min_silence_seconds / opts.frame_seconds)
    for value, a, b in _runs(speech):
        if not value and 0 < a and b < speech.size and b - a < min_silence:
            speech[a:b] = True  # a pause inside speech, too short to cut at
    min_speech = round(opts.min_speech_seconds / opts.frame_seconds)
    for value, a, b in _runs(speech):
        if value and b - a < min_speech:
            speech[a:b] = False
    return speech


def speech_regions(samples: np.ndarray, opts: VadOptions = VadOptions()) -> list[Span]:
    """Speech regions in samples, padded by ``pad_seconds`` (split in the middle of pauses
    shorter than twice that), in order and not overlapping."""
    frame = max(1, round(opts.frame_seconds * SAMPLE_RATE))
    n = np.asarray(samples).shape[0]
    spans = [(a * frame, min(b * frame, n)) for v, a, b in _runs(speech_frames(samples, opts)) if v]
    pad = round(opts.pad_seconds * SAMPLE_RATE)
    out: list[Span] = []
    for k, (a, b) in enumerate(spans):
        room_before = (a - spans[k - 1][1]) // 2 if k else a  # a pause is shared by two regions
        room_after = (spans[k + 1][0] - b) // 2 if k + 1 < len(spans) else n - b
        out.append((a - min(pad, room_before), b + min(pad, room_after)))
    return out


def _split_long(span: Span, samples: np.ndarray, opts: VadOptions) -> list[Span]:
    """Cut a region longer than a chunk at its quietest frames (see the module docstring)."""
    frame = max(1, round(opts.frame_seconds * SAMPLE_RATE))
    limit = int(opts.max_chunk_seconds * SAMPLE_RATE) // frame * frame
    out = []
    a, b = span
    while b - a > limit:
        lo, hi = a + limit // 2, a + limit  # the cut lies in [lo, hi]
        db = frame_energy_db(samples[lo:hi], frame)
        quietest = db.size - 1 - int(np.argmin(db[::-1]))  # the latest, so chunks stay long
        cut = min(max(lo + quietest * frame, lo + frame), hi)
        out.append((a, cut))
        a = cut
    out.append((a, b))
    return out


def chunks(samples: np.ndarray, opts: VadOptions = VadOptions()) -> list[Span]:
    """Spans of at most ``max_chunk_seconds`` covering all speech, cut only at pauses (or,
    inside a region longer than a chunk, at its quietest point). A chunk keeps the pauses
    between the regions it joins; silence between chunks is left out."""
    samples = np.asarray(samples)
    limit = int(opts.max_chunk_seconds * SAMPLE_RATE)
    regions = [p for r in speech_regions(samples, opts) for p in _split_long(r, samples, opts)]
    out: list[Span] = []
    for a, b in regions:
        if out and b - out[-1][0] <= limit:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out
