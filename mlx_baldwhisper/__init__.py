"""mlx-baldwhisper: Whisper in MLX, with BaldWhisper compression and on-laptop training."""

from ._blas import ensure_fast_blas

BLAS = ensure_fast_blas()  # must run before mlx.core is first imported (see _blas.py)

from .load import load_model  # noqa: E402
from .transcribe import transcribe  # noqa: E402
from .weights import ModelLoadError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["load_model", "transcribe", "ModelLoadError", "__version__"]

