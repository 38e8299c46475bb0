"""Small generated audio files for the ingestion tests."""

from __future__ import annotations

import pathlib

import numpy as np
import soundfile

_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS"),
            ".mp3": ("MP3", "MPEG_LAYER_III")}


def tone(seconds: float, rate: int = 16_000, freq: float = 440.0, amplitude: float = 0.3,
         seed: int = 0) -> np.ndarray:
    """A sine plus a little noise, so every file differs and none is silent."""
    t = np.arange(round(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.01, t.size)
    return (amplitude * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def write_audio(path: pathlib.Path, seconds: float = 1.0, rate: int = 16_000, seed: int = 0,
                wave: np.ndarray | None = None) -> pathlib.Path:
    """Writes a tone (or `wave`) in the format the file extension names; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt, subtype = _FORMATS[path.suffix]
    data = tone(seconds, rate, freq=220.0 + 40 * seed, seed=seed) if wave is None else wave
    soundfile.write(path, data, rate, format=fmt, subtype=subtype)
    return path
