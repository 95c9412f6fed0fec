"""How many encoder positions a 30-second window gets: the audio context policy.

Whisper encodes every window over 1500 positions (30 s), however little of it is
speech; on a 5-s clip most of the encoder's work is padding. A shorter context is
only safe for a model trained to use it (the ``audio-context`` stage): an untrained
model loops or stops early, and a margin of silence past the speech matters
(whisper-acft found margins under 32 positions break on real audio).

The policy is configuration saved in the model's ``config.json`` (``"audio_context"``)
and can be overridden per call. ``full`` is Whisper's: every window is 1500 positions.
``dynamic`` shrinks windows whose speech is shorter than 30 s (short files, and the
last window of a long one) to ``ceil((speech_frames / 2 + margin) / block) * block``
positions. ``fixed`` encodes every window over ``positions`` positions, and a window
then holds at most ``2 * positions`` mel frames of audio.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence, Union

MODES = ("full", "dynamic", "fixed")
DEFAULT_MARGIN = 64  # positions (1.28 s) of what follows the speech
DEFAULT_BLOCK = 16  # positions are rounded up to a multiple of this (fewer distinct shapes)

Spec = Union[None, str, int, Mapping[str, Any], "AudioContext"]


class AudioContextError(ValueError):
    """An audio context setting that cannot be used."""


@dataclass(frozen=True)
class AudioContext:
    mode: str = "full"
    margin: int = DEFAULT_MARGIN
    block: int = DEFAULT_BLOCK
    positions: Optional[int] = None  # for mode "fixed"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AudioContextError(f"audio context mode must be one of {', '.join(MODES)}, "
                                    f"not {self.mode!r}")
        for name, low in (("margin", 0), ("block", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise AudioContextError(f"audio context {name} must be a whole number >= {low}, "
                                        f"not {value!r}")
        if self.mode == "fixed":
            p = self.positions
            if isinstance(p, bool) or not isinstance(p, int) or p < 1:
                raise AudioContextError(f"a fixed audio context needs positions >= 1, not {p!r}")

    @property
    def is_full(self) -> bool:
        return self.mode == "full"

    def window_frames(self, n_audio_ctx: int) -> int:
        """Mel frames of audio one window may hold (2 per encoder position)."""
        if self.mode == "fixed":
            return 2 * min(self.positions or n_audio_ctx, n_audio_ctx)
        return 2 * n_audio_ctx

    def positions_for(self, speech_frames: int, n_audio_ctx: int) -> int:
        """Encoder positions for a window holding ``speech_frames`` mel frames of audio."""
        if self.mode == "full":
            return n_audio_ctx
        if self.mode == "fixed":
            return min(self.positions or n_audio_ctx, n_audio_ctx)
        need = speech_frames / 2 + self.margin
        return max(1, min(n_audio_ctx, math.ceil(need / self.block) * self.block))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["positions"] is None:
            del d["positions"]
        return d

    @classmethod
    def parse(cls, spec: Spec, default: Optional["AudioContext"] = None) -> "AudioContext":
        """From a model's config (a dict), a user's override ("full", "dynamic", a number of
        positions, or "dynamic:MARGIN"), or None (the ``default``, else full)."""
        if spec is None:
            return default or cls()
        if isinstance(spec, AudioContext):
            return spec
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"mode", "margin", "block", "positions"}
            if unknown:
                raise AudioContextError(f"unknown audio context settings: {', '.join(sorted(unknown))}")
            return cls(**spec)
        if isinstance(spec, bool):
            raise AudioContextError(f"audio context must be full, dynamic or a number, not {spec!r}")
        if isinstance(spec, int):
            return cls(mode="fixed", positions=spec)
        if isinstance(spec, str):
            text = spec.strip().lower()
            if text.isdigit():
                return cls(mode="fixed", positions=int(text))
            mode, _, margin = text.partition(":")
            base = default if default is not None and default.mode == mode else cls(mode=mode)
            if margin:
                if not margin.isdigit():
                    raise AudioContextError(f"audio context margin must be a whole number: {spec!r}")
                return cls(mode=mode, margin=int(margin), block=base.block)
            return cls(mode=mode, margin=base.margin, block=base.block)
        raise AudioContextError(f"audio context must be full, dynamic or a number, not {spec!r}")


def of_model(model: Any, override: Spec = None) -> AudioContext:
    """The policy a model transcribes with: ``override``, else its config's, else full."""
    saved = AudioContext.parse(model.extra_config.get("audio_context"))
    return AudioContext.parse(override, default=saved)


def encode_windows(model: Any, mels: Sequence[Any], positions: Sequence[int],
                   frames: Optional[Sequence[int]] = None) -> tuple[Any, Optional[list[int]]]:
    """Encode windows in one batch, each over its own ``positions``; the one place that
    turns windows into encoder input, for transcription, chunked decoding and the cache.

    Each mel (frames x n_mels, numpy or MLX, any length) is cut or zero-padded to twice the
    widest window's positions; with ``frames`` (each window's mel frames of audio) the mel
    past them is zeroed, so a window encodes exactly as it would alone. Returns the
    features (padded to the widest) and the positions per window when they differ."""
    import mlx.core as mx

    width = max(positions)
    n = 2 * width
    rows = []
    for i, mel in enumerate(mels):
        row = mx.array(mel)[:n if frames is None else min(n, frames[i])]
        if row.shape[0] < n:
            row = mx.pad(row, [(0, n - row.shape[0]), (0, 0)])
        rows.append(row)
    lengths = None if min(positions) == width else [int(p) for p in positions]
    batch = mx.stack(rows).astype(model.dtype)
    if lengths is None:
        return model.embed_audio(batch), None
    return model.embed_audio(batch, mx.array(lengths)), lengths
