"""The shape of a Whisper model: the one type every layer of the package agrees on.

Dimensions come from files (config.json, checkpoints) that may be hostile, so each is
checked when the object is made: a whole number in a range far beyond any Whisper,
heads that divide their width. Absurd values fail here, before a model is built.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

# Inclusive bounds per dimension: generous (large-v3 is 128 mels, 1500 audio positions,
# width 1280, 32 layers, 51866 tokens, 448 text positions), yet small enough that no
# value can ask for an absurd amount of memory or time before the weights are checked.
LIMITS = {
    "n_mels": (1, 512), "n_audio_ctx": (1, 16384), "n_audio_state": (1, 16384),
    "n_audio_head": (1, 1024), "n_audio_layer": (0, 256), "n_vocab": (1, 1 << 20),
    "n_text_ctx": (1, 8192), "n_text_state": (1, 16384), "n_text_head": (1, 1024),
    "n_text_layer": (0, 256),
}


class InvalidDimensionsError(ValueError):
    """A dimension that is not a whole number, out of range, or inconsistent."""


@dataclass
class ModelDimensions:
    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 512
    n_audio_head: int = 8
    n_audio_layer: int = 6
    n_vocab: int = 51865
    n_text_ctx: int = 448
    n_text_state: int = 512
    n_text_head: int = 8
    n_text_layer: int = 6
    # BaldWhisper: rank of the factored tied embedding (None = full embedding).
    embedding_rank: Optional[int] = None
    # ... and how many of its last rows (special and timestamp tokens) stay whole.
    embedding_exact_rows: Optional[int] = None

    def __post_init__(self) -> None:
        for name, (low, high) in LIMITS.items():
            setattr(self, name, _whole(name, getattr(self, name), low, high))
        if self.embedding_rank is not None:
            self.embedding_rank = _whole("embedding_rank", self.embedding_rank, 1, self.n_vocab)
        if self.embedding_exact_rows is not None:
            if not self.embedding_rank:
                raise InvalidDimensionsError("embedding_exact_rows needs embedding_rank")
            self.embedding_exact_rows = _whole("embedding_exact_rows", self.embedding_exact_rows,
                                               0, self.n_vocab - 1)
        for side in ("audio", "text"):
            state, head = getattr(self, f"n_{side}_state"), getattr(self, f"n_{side}_head")
            if state % head:
                raise InvalidDimensionsError(
                    f"n_{side}_state={state} does not split into n_{side}_head={head} equal heads")

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelDimensions":
        if not isinstance(d, Mapping):
            raise InvalidDimensionsError(f"the dimensions must be a JSON object, not {d!r:.80}")
        unknown = set(d) - cls.names()
        if unknown:
            raise InvalidDimensionsError(f"unknown ModelDimensions settings: {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelDimensions":
        """From a model folder's flat config.json, where the dimensions sit beside other keys."""
        return cls.from_dict({k: v for k, v in cfg.items() if k in cls.names()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _whole(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidDimensionsError(f"{name} must be a whole number, not {value!r}")
    if not low <= value <= high:
        raise InvalidDimensionsError(f"{name}={value} is outside the possible range {low}..{high}")
    return int(value)
