"""The shape of a Whisper model: the one type every layer of the package agrees on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional


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

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelDimensions":
        unknown = set(d) - cls.names()
        if unknown:
            raise ValueError(f"unknown ModelDimensions settings: {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelDimensions":
        """From a model folder's flat config.json, where the dimensions sit beside other keys."""
        return cls.from_dict({k: v for k, v in cfg.items() if k in cls.names()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
