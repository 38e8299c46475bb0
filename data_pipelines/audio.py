"""Audio file I/O: decode any libsndfile format to 16 kHz mono float32, normalize, pad."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import numpy as np
import soundfile
import soxr

from data_pipelines.errors import UserError

SAMPLE_RATE = 16_000

# Same epsilon as Hugging Face `Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm`, so features
# computed here match checkpoints fine-tuned with the HF pipeline.
_NORM_EPS = 1e-7

PathLike = str | os.PathLike[str]


class AudioError(UserError):
    """An audio file that cannot be turned into a usable waveform; the message names the file."""

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@contextlib.contextmanager
def open_audio(path: PathLike) -> Iterator[soundfile.SoundFile]:
    """`soundfile.SoundFile` reading `path`. soundfile encodes names as UTF-8 and fails on any other
    bytes a file system allows, so such a file is handed over open instead."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        with open(path, "rb") as raw, soundfile.SoundFile(raw) as f:
            yield f
        return
    with soundfile.SoundFile(path) as f:
        yield f


def load_audio(path: PathLike, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Reads an audio file as a 1-D float32 mono waveform at `target_rate` Hz."""
    if target_rate <= 0:
        raise ValueError(f"target_rate must be positive, got {target_rate}")
    # libsndfile reports a missing file or a directory as "System error" / "Format not
    # recognised"; checking first gives the caller a message that says what is actually wrong.
    if not os.path.exists(path):
        raise AudioError(path, "no such file")
    if os.path.isdir(path):
        raise AudioError(path, "is a directory, not an audio file")
    try:
        with open_audio(path) as f:
            data, rate = f.read(dtype="float32", always_2d=True), f.samplerate
    except (soundfile.LibsndfileError, RuntimeError) as err:
        raise AudioError(path, f"cannot decode audio ({err})") from err

    if data.shape[0] == 0:
        raise AudioError(path, "contains zero samples")
    # NaN/inf would survive resampling and normalization and only surface as a NaN loss much later.
    if not np.isfinite(data).all():
        raise AudioError(path, "contains non-finite samples (NaN or inf)")

    # Averaging keeps the level comparable to a mono recording of the same source.
    wave = data.mean(axis=1, dtype=np.float32)
    if rate != target_rate:
        wave = soxr.resample(wave, rate, target_rate, quality="HQ")
    return np.ascontiguousarray(wave, dtype=np.float32)


def normalize(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance for one unpadded utterance, as Hugging Face wav2vec 2.0 does."""
    x = np.asarray(x, dtype=np.float32)
    return ((x - x.mean()) / np.sqrt(x.var() + _NORM_EPS)).astype(np.float32)


def pad_batch(
    waves: Sequence[np.ndarray], pad_to_multiple_of: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads 1-D waveforms with zeros; returns (audio [B, T] float32, mask [B, T] int32)."""
    if len(waves) == 0:
        raise ValueError("pad_batch needs at least one waveform, got an empty list")
    if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
        raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
    for i, wave in enumerate(waves):
        if np.ndim(wave) != 1:
            raise ValueError(f"waveform {i} must be 1-D, got shape {np.shape(wave)}")

    length = max(len(w) for w in waves)
    if pad_to_multiple_of is not None:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    audio = np.zeros((len(waves), length), dtype=np.float32)
    mask = np.zeros((len(waves), length), dtype=np.int32)
    for i, wave in enumerate(waves):
        audio[i, : len(wave)] = wave
        mask[i, : len(wave)] = 1
    return audio, mask


def load_batch(
    paths: Sequence[PathLike], target_rate: int = SAMPLE_RATE, do_normalize: bool = False
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Loads, optionally normalizes and pads files; returns (audio, mask, lengths)."""
    waves = [load_audio(p, target_rate) for p in paths]
    # Normalizing before padding keeps padding zeros out of the statistics, as HF does.
    if do_normalize:
        waves = [normalize(w) for w in waves]
    audio, mask = pad_batch(waves)
    return audio, mask, [len(w) for w in waves]
