"""A few short bundled speech clips (16 kHz mono FLAC) for smoke tests and examples."""

from __future__ import annotations

import pathlib

SAMPLES_DIR = pathlib.Path(__file__).resolve().parent / "samples"
TRANSCRIPTS = SAMPLES_DIR / "transcripts.tsv"


def sample_paths() -> list[pathlib.Path]:
    """Returns the bundled FLAC clips, sorted by file name."""
    return sorted(SAMPLES_DIR.glob("*.flac"))
