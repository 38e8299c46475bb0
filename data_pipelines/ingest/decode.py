"""Decode one input file into records, or say why it is skipped (runs in worker processes).

Skip reasons, in the order they are checked (the first three are found while discovering inputs):

    duplicate   a path listed again (in the same or another split, or by another input): the first is kept
    outside_root  a manifest entry whose relative path leads outside the manifest's audio root
    bad_text    the transcript beside the audio is not UTF-8 text
    unreadable  a directory that cannot be listed, a file that may not be read, missing, not an audio format libsndfile knows, or undecodable from the start
    empty       zero bytes, or a valid header with no audio frames
    truncated   fewer frames than the header promises: libsndfile's WAV log ("data : N (should be M)"),
                a decoder error after some frames (FLAC "lost sync"), or a short decode (MP3)
    non_finite  NaN or inf samples (float WAV)
    too_short   under `Filters.min_seconds` at 16 kHz (or no samples left after resampling)
    silent      peak below `Filters.silence_peak` after mixing to mono
    too_long    over `Filters.max_seconds`, unless `split_long` cuts it into equal chunks
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np
import soundfile

from data_pipelines.audio import SAMPLE_RATE, AudioError, load_audio, open_audio
from data_pipelines.errors import UserError
from data_pipelines.ingest.layouts import Item
from data_pipelines.records import CODECS, Utterance, encode_record

REASONS = ("duplicate", "outside_root", "bad_text", "unreadable", "empty", "truncated", "non_finite", "too_short", "silent", "too_long")

# libsndfile logs a chunk whose declared size exceeds the bytes present as "data : 96000 (should be 47978)".
_SHORT_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Streaming writers leave the size as a placeholder (0xFFFFFFFF) they never fill in: not truncation.
_PLACEHOLDER_SIZE = 0xFFFFFF00
# MP3 frame counts in the header are estimates and decoders add or drop padding frames.
_LENGTH_TOLERANCE = (0.01, 0.1)  # (fraction, seconds): the larger is allowed


@dataclasses.dataclass(frozen=True)
class Filters:
    """What makes a decoded file usable."""

    min_seconds: float = 0.5
    max_seconds: float = 30.0
    split_long: bool = False
    silence_peak: float = 1e-3  # -60 dBFS: below this the file holds no usable signal

    def __post_init__(self) -> None:
        if not 0 <= self.min_seconds < self.max_seconds:
            raise UserError(f"need 0 <= min_seconds < max_seconds, got {self.min_seconds} and "
                             f"{self.max_seconds}")
        # Equal chunks of an over-long file are longer than max/2; a larger minimum would drop them.
        if self.split_long and self.min_seconds > self.max_seconds / 2:
            raise UserError(f"split_long needs min_seconds <= max_seconds / 2, got {self.min_seconds} "
                             f"and {self.max_seconds}")


class Skip(Exception):
    """A file that is left out, with one of `REASONS` and a human-readable detail."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclasses.dataclass
class Decoded:
    """What a worker hands back for one item: encoded records, or the reason it was skipped."""

    records: list[bytes] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)  # samples per record
    skip: tuple[str, str] | None = None  # (reason, detail)


def _decodable_frames(path: str) -> int:
    n = 0
    try:
        with open_audio(path) as f:
            for block in f.blocks(blocksize=4096):
                n += len(block)
    except (soundfile.LibsndfileError, RuntimeError):
        pass
    return n


def load_checked(path: str, filters: Filters) -> np.ndarray:
    """16 kHz mono float32 audio of `path`, or raises `Skip`; never returns a bad waveform."""
    if not os.path.isfile(path):
        if os.path.islink(path):
            raise Skip("unreadable", "a symbolic link to nothing (broken or looping)")
        raise Skip("unreadable", "no such file")
    if os.path.getsize(path) == 0:
        raise Skip("empty", "zero-byte file")
    try:
        open(path, "rb").close()  # libsndfile reports a permission error as "System error."
    except PermissionError:
        raise Skip("unreadable", "permission denied: the user running prepare cannot read it") from None
    try:
        with open_audio(path) as f:
            frames, rate, log = f.frames, f.samplerate, f.extra_info
    except (soundfile.LibsndfileError, RuntimeError) as err:
        raise Skip("unreadable", str(err)) from None
    if frames == 0:
        raise Skip("empty", "the header declares no audio frames")
    for declared, present in _SHORT_CHUNK.findall(log):
        if int(present) < int(declared) < _PLACEHOLDER_SIZE:
            raise Skip("truncated", f"data chunk declares {declared} bytes, file holds {present}")
    try:
        wave = load_audio(path, SAMPLE_RATE)
    except AudioError as err:
        if err.reason.startswith("contains zero samples"):
            raise Skip("empty", err.reason) from None
        if err.reason.startswith("contains non-finite"):
            raise Skip("non_finite", err.reason) from None
        decoded = _decodable_frames(path)
        if decoded > 0:
            raise Skip("truncated",
                       f"decoding stops after {decoded} of {frames} frames ({err.reason})") from None
        raise Skip("unreadable", err.reason) from None

    expected = frames * SAMPLE_RATE / rate
    if len(wave) < expected - max(_LENGTH_TOLERANCE[0] * expected, _LENGTH_TOLERANCE[1] * SAMPLE_RATE):
        raise Skip("truncated", f"decoded {len(wave) / SAMPLE_RATE:.2f} s of the "
                                f"{expected / SAMPLE_RATE:.2f} s the header declares")
    seconds = len(wave) / SAMPLE_RATE
    # Before the silence check: a few samples resampled to none are short, not silent.
    if seconds < filters.min_seconds or wave.size == 0:
        raise Skip("too_short", f"{len(wave)} samples ({seconds:.3f} s) < {filters.min_seconds} s")
    peak = float(np.abs(wave).max())
    if peak < filters.silence_peak:
        raise Skip("silent", f"peak {peak:.2e} < {filters.silence_peak:.0e}")
    if seconds > filters.max_seconds and not filters.split_long:
        raise Skip("too_long", f"{seconds:.1f} s > {filters.max_seconds} s")
    return wave


def split_long(wave: np.ndarray, max_samples: int) -> list[np.ndarray]:
    """Equal consecutive chunks of at most `max_samples` (the whole wave when it fits)."""
    n = math.ceil(len(wave) / max_samples)
    return [wave] if n <= 1 else np.array_split(wave, n)


def decode_item(item: Item, filters: Filters, codec: str) -> Decoded:
    """Loads, checks and encodes one item (top-level so spawn-started workers can import it)."""
    if codec not in CODECS:
        raise UserError(f"unknown codec {codec!r}; choose one of {CODECS}")
    if item.skip is not None:
        return Decoded(skip=item.skip)
    try:
        wave = load_checked(item.path, filters)
    except Skip as skip:
        return Decoded(skip=(skip.reason, skip.detail))
    except Exception as err:  # noqa: BLE001 - one odd file (e.g. absurd header sizes) must not stop a run
        return Decoded(skip=("unreadable", f"{type(err).__name__}: {err}"))
    chunks = split_long(wave, int(filters.max_seconds * SAMPLE_RATE))
    out = Decoded()
    for k, chunk in enumerate(chunks):
        # A transcript cannot be aligned to a chunk, so chunks carry none.
        utt = (Utterance(item.id, chunk, item.language, item.text) if len(chunks) == 1
               else Utterance(f"{item.id}#{k:03d}", chunk, item.language, ""))
        out.records.append(encode_record(utt, codec))
        out.lengths.append(len(chunk))
    return out
