"""Bundled speech: a few short clips (`samples/`) and a small multilingual corpus (`speech/`), 16 kHz FLAC."""

from __future__ import annotations

import pathlib

SAMPLES_DIR = pathlib.Path(__file__).resolve().parent / "samples"
TRANSCRIPTS = SAMPLES_DIR / "transcripts.tsv"


def sample_paths() -> list[pathlib.Path]:
    """Returns the bundled FLAC clips, sorted by file name."""
    return sorted(SAMPLES_DIR.glob("*.flac"))


def corpus_dir() -> pathlib.Path:
    """Root of the embedded multilingual corpus (`speech/`, made by `make_corpus.py`)."""
    return pathlib.Path(__file__).resolve().parent / "speech"


def manifest_path() -> pathlib.Path:
    """The corpus manifest: path (relative to `corpus_dir()`), language, split, text."""
    return corpus_dir() / "manifest.tsv"
