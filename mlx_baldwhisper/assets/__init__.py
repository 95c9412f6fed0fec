"""Files that ship inside the package (see README.md in this folder for their origin)."""

from pathlib import Path

HERE = Path(__file__).parent


def sample_audio() -> Path:
    """An 11-second English speech clip for quickstarts and smoke tests."""
    return HERE / "jfk.flac"
