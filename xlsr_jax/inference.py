"""Speech recognition (CTC) and utterance classification with a model directory, on audio of any length.

A waveform of up to `chunk_frames` frames runs whole, in one forward pass. A longer one runs as
overlapping windows, in the Hugging Face ASR pipeline's stride style, with exact frame bookkeeping:

  * the conv stack gives frame g the samples [g * hop, g * hop + receptive_field) (hop = 320 and
    receptive field = 400 for wav2vec 2.0), so a window that starts at a multiple of the hop and is
    `chunk_frames * hop + receptive_field - hop` samples long makes exactly the file's frames
    [start / hop, start / hop + chunk_frames);
  * consecutive windows advance by `chunk_frames - 2 * overlap_frames` frames; each keeps only the
    frames outside its `overlap_frames` margins (the first keeps its left margin, the last its right
    one), so the kept frames tile the file's frames once each, in order, and every kept frame away
    from the file's ends has at least `overlap_frames` frames of context on both sides;
  * the last window is moved back to end exactly at the file's last frame, so every window of a long
    file has the same length and needs no padding: one compiled program serves any duration.

CTC logits of the kept frames are concatenated, then decoded once (greedy: argmax per frame, merge
repeats, drop blanks). Classification averages the windows' class log-probabilities, each weighted
by the number of frames it keeps (its share of the file), and renormalizes with a softmax; a file
that fits one window gets the softmax of its single forward pass.

The whole waveform is normalized (when the config says `do_normalize`) before it is cut, so windows
see the same values as a single pass would. Whole files shorter than a window are right-padded to
whole seconds with an attention mask (a handful of programs for a folder of clips); group-norm models
(wav2vec 2.0 base) normalize conv features over the padded length, so those run unpadded. Batch rows
are padded to a power of two up to `batch_size`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np

from data_pipelines.audio import SAMPLE_RATE, AudioError, load_audio, normalize
from data_pipelines.errors import UserError
from data_pipelines.vocab import Vocabulary
from xlsr_jax.config import Wav2Vec2Config
from xlsr_jax.embed import BUCKET_SAMPLES, num_samples
from xlsr_jax.model_dir import ModelDirError, load_model_dir, read_config
from xlsr_jax.models.heads import build_model

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SECONDS = 30.0
DEFAULT_OVERLAP_SECONDS = 5.0
DEFAULT_BATCH_SIZE = 8
INFERENCE_HEADS = ("ctc", "sequence_classification")


def receptive_field(config: Wav2Vec2Config) -> int:
    """Samples one frame sees through the conv stack (400 for wav2vec 2.0's 320x stack)."""
    field, jump = 1, 1
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        field += (kernel - 1) * jump
        jump *= stride
    return field


@dataclasses.dataclass(frozen=True)
class Window:
    """Samples [start, start + length) of a waveform; its output frames [keep_start, keep_stop) are kept."""

    start: int
    length: int
    keep_start: int
    keep_stop: int

    @property
    def kept(self) -> int:
        return self.keep_stop - self.keep_start


def chunk_frames(config: Wav2Vec2Config, chunk_seconds: float, overlap_seconds: float) -> tuple[int, int]:
    """(frames per window, overlap frames on each side), rounded to whole frames and validated."""
    frames_per_second = SAMPLE_RATE / config.downsample
    chunk = round(chunk_seconds * frames_per_second)
    overlap = round(overlap_seconds * frames_per_second)
    if chunk < 1:
        raise UserError(f"chunk_seconds={chunk_seconds} is less than one frame ({1 / frames_per_second} s)")
    if overlap < 0:
        raise UserError(f"overlap_seconds={overlap_seconds} must not be negative")
    if chunk - 2 * overlap < 1:
        raise UserError(
            f"chunk_seconds={chunk_seconds} must be more than twice overlap_seconds={overlap_seconds} "
            "(each window keeps what is left between its two overlaps)"
        )
    return chunk, overlap


def plan_windows(config: Wav2Vec2Config, num_samples: int, chunk: int, overlap: int) -> list[Window]:
    """The windows that cover a waveform of `num_samples` samples (see the module docstring).

    Invariant: the kept frames, window after window, are exactly 0 .. config.num_frames(num_samples) - 1.
    """
    hop = config.downsample
    total = int(config.num_frames(num_samples))
    if total < 1:
        need = receptive_field(config)
        raise UserError(f"too short: {num_samples} samples make no frame (the model needs at least {need})")
    if total <= chunk:
        return [Window(0, num_samples, 0, total)]
    length = chunk * hop + receptive_field(config) - hop
    windows, kept, first = [], 0, 0
    while True:
        last = first + chunk >= total
        if last:  # end exactly at the file's last frame: full length, no padding
            first = total - chunk
        stop = total if last else first + chunk - overlap
        windows.append(Window(first * hop, length, kept - first, stop - first))
        if last:
            return windows
        kept = stop
        first += chunk - 2 * overlap


class Classification(NamedTuple):
    label: str
    probability: float
    probs: np.ndarray  # [num_labels] float64, sums to 1


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# Module-level, with the (hashable) Flax module static: predictors of the same model share programs.
@functools.partial(jax.jit, static_argnums=0)
def _logits(model: nn.Module, params: dict, audio: jax.Array, mask: jax.Array) -> jax.Array:
    return model.apply({"params": params}, audio, mask).logits


def _batch_rows(n: int, batch_size: int) -> int:
    """Rows for `n` inputs: the next power of two, at most `batch_size` (a few programs, not one per n)."""
    return min(batch_size, 1 << (n - 1).bit_length())


class Predictor:
    """A CTC or sequence-classification model that runs waveforms of any length in fixed-shape windows."""

    def __init__(
        self,
        config: Wav2Vec2Config,
        head: str,
        params: dict,
        vocab: Vocabulary | None = None,
        chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
        overlap_seconds: float = DEFAULT_OVERLAP_SECONDS,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if head not in INFERENCE_HEADS:
            raise UserError(f"a {head!r} head has no predictions to make; use one of {INFERENCE_HEADS}")
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        self.config, self.head, self.params, self.vocab = config, head, params, vocab
        self.chunk, self.overlap = chunk_frames(config, chunk_seconds, overlap_seconds)
        self.batch_size = batch_size
        self.model = build_model(config, head)

    @classmethod
    def load(
        cls,
        model_dir: str | pathlib.Path,
        dtype: str | None = None,
        chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
        overlap_seconds: float = DEFAULT_OVERLAP_SECONDS,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> Predictor:
        """Read a model directory (a CTC one must hold vocab.json); `dtype` overrides the compute dtype."""
        config, head = read_config(model_dir)  # head and vocabulary are checked before any params are read
        if head not in INFERENCE_HEADS:
            raise ModelDirError(
                f"{model_dir} has a {head!r} head, which makes no transcript or label; "
                "give a 'ctc' (speech recognition) or 'sequence_classification' model directory"
            )
        vocab = _load_vocab(pathlib.Path(model_dir), config) if head == "ctc" else None
        chunk_frames(config, chunk_seconds, overlap_seconds)
        config, head, params = load_model_dir(model_dir, **({"dtype": dtype} if dtype else {}))
        return cls(config, head, params, vocab, chunk_seconds, overlap_seconds, batch_size)

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names: config.id2label, or LABEL_i where the config has none."""
        return self.config.id2label or tuple(f"LABEL_{i}" for i in range(self.config.num_labels))

    @property
    def window_samples(self) -> int:
        """Length of every window of a long waveform."""
        return self.chunk * self.config.downsample + receptive_field(self.config) - self.config.downsample

    def forward(self, audio: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Float32 head logits ([B, frames, vocab] or [B, labels]) of [B, samples] audio and its 0/1 mask."""
        return np.asarray(_logits(self.model, self.params, audio, mask))

    def windows(self, num_samples: int) -> list[Window]:
        """How a waveform of `num_samples` samples is cut; raises ValueError when it makes no frame."""
        return plan_windows(self.config, num_samples, self.chunk, self.overlap)

    def ctc_logits(self, wave: np.ndarray) -> np.ndarray:
        """float32 [frames, vocab] logits of a 16 kHz waveform (normalized here when the config says so)."""
        self._require("ctc")
        return self.run([wave])[0]

    def transcribe(self, wave: np.ndarray) -> str:
        """Greedy CTC transcript of a 16 kHz waveform."""
        return self.decode(self.ctc_logits(wave))

    def decode(self, logits: np.ndarray) -> str:
        """Greedy CTC decoding of [frames, vocab] logits: argmax per frame, merge repeats, drop blanks."""
        if self.vocab is None:
            raise UserError("this predictor has no vocabulary to spell CTC outputs with")
        return self.vocab.decode(np.argmax(logits, axis=-1), ctc=True)

    def classify(self, wave: np.ndarray) -> Classification:
        """Most likely label of a 16 kHz waveform, its probability, and every label's probability."""
        self._require("sequence_classification")
        return self.to_classification(self.run([wave])[0])

    def to_classification(self, log_probs: np.ndarray) -> Classification:
        """A `Classification` from combined [num_labels] log-probabilities (what `run` returns)."""
        probs = np.exp(_log_softmax(log_probs))
        best = int(np.argmax(probs))
        return Classification(self.labels[best], float(probs[best]), probs)

    def run(
        self, waves: Sequence[np.ndarray], on_progress: Callable[[int], object] | None = None
    ) -> list[np.ndarray]:
        """Per waveform: stitched CTC logits [frames, vocab] or combined class log-probabilities [labels].

        Windows of all `waves` are batched together; `on_progress(samples)` is called after each batch
        with the audio it finished (the counts add up to the waveforms' total length).
        """
        cfg, hop = self.config, self.config.downsample
        prepared, plans, credits = [], [], []
        for i, wave in enumerate(waves):
            wave = np.asarray(wave, np.float32)
            if wave.ndim != 1:
                raise ValueError(f"waveform {i} must be 1-D (mono samples), got shape {wave.shape}")
            plan = self.windows(len(wave))
            # Normalize the whole waveform first: every window then sees what a single pass would see.
            prepared.append(normalize(wave) if cfg.do_normalize else wave)
            plans.append(plan)
            credit = [w.kept * hop for w in plan]
            credit[-1] += len(wave) - sum(credit)
            credits.append(credit)

        groups: dict[int, list[tuple[int, int]]] = {}  # padded length -> (waveform, window) pairs
        for i, plan in enumerate(plans):
            for k, window in enumerate(plan):
                groups.setdefault(self._padded_length(window.length), []).append((i, k))
        pieces: list[list[np.ndarray | None]] = [[None] * len(plan) for plan in plans]
        for length, items in groups.items():
            for lo in range(0, len(items), self.batch_size):
                batch = items[lo : lo + self.batch_size]
                rows = _batch_rows(len(batch), self.batch_size)
                audio = np.zeros((rows, length), np.float32)
                mask = np.zeros((rows, length), np.int32)
                mask[len(batch) :] = 1  # filler rows: all "real" zeros keep every row's math finite
                for r, (i, k) in enumerate(batch):
                    w = plans[i][k]
                    audio[r, : w.length] = prepared[i][w.start : w.start + w.length]
                    mask[r, : w.length] = 1
                logits = self.forward(audio, mask)
                for r, (i, k) in enumerate(batch):
                    w = plans[i][k]
                    pieces[i][k] = logits[r, w.keep_start : w.keep_stop] if self.head == "ctc" else logits[r]
                if on_progress is not None:
                    on_progress(sum(credits[i][k] for i, k in batch))

        if self.head == "ctc":
            return [np.concatenate(p, axis=0) for p in pieces]
        out = []
        for plan, p in zip(plans, pieces):
            weights = np.array([w.kept for w in plan], np.float64)
            out.append((weights[:, None] * _log_softmax(np.stack(p))).sum(0) / weights.sum())
        return out

    def _padded_length(self, length: int) -> int:
        if self.config.feat_extract_norm == "group" or length == self.window_samples:
            return length
        return -(-length // BUCKET_SAMPLES) * BUCKET_SAMPLES

    def _require(self, head: str) -> None:
        if self.head != head:
            raise UserError(f"this is a {self.head!r} model; that needs a {head!r} one")


def _load_vocab(model_dir: pathlib.Path, config: Wav2Vec2Config) -> Vocabulary:
    path = model_dir / "vocab.json"
    if not path.is_file():
        raise ModelDirError(f"{model_dir} is a CTC model directory without vocab.json: nothing to spell with")
    try:
        vocab = Vocabulary.load(path)
    except (ValueError, KeyError, AttributeError, TypeError) as e:  # the others: not a {token: id} map
        raise ModelDirError(f"{path} is not a CTC vocabulary: {e}") from e
    if len(vocab) != config.vocab_size:
        raise ModelDirError(f"{path} has {len(vocab)} tokens, the model vocab_size={config.vocab_size}")
    return vocab


@dataclasses.dataclass
class FileResult:
    """One input file's outcome: a transcript, a label, or the reason it could not be used."""

    path: pathlib.Path
    text: str | None = None
    label: str | None = None
    probability: float | None = None
    error: str | None = None


def predict_files(
    predictor: Predictor, paths: Sequence[str | pathlib.Path], progress: bool = True
) -> Iterator[FileResult]:
    """One `FileResult` per path, in input order, as soon as its batch is done.

    A missing, unreadable or too-short file yields a result with `error` set and the others still
    run. Files are read a few at a time (up to `batch_size` files or `batch_size` windows of audio),
    so memory holds a few files, never the whole list. `progress` shows a bar on stderr
    (seconds of audio done, with the rate) once the work has taken more than two seconds.
    """
    from tqdm import tqdm

    paths = [pathlib.Path(p) for p in paths]
    if not paths:
        raise UserError("no audio files given")
    total = sum(num_samples(p) for p in paths)
    bar = tqdm(total=total, unit="s audio", unit_scale=1 / SAMPLE_RATE, desc="transcribe", delay=2.0,
               disable=not progress, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of audio "
                          "[{elapsed}<{remaining}, {rate_fmt}]")
    flush_samples = predictor.batch_size * predictor.window_samples
    pending: list[tuple[pathlib.Path, np.ndarray | None, str | None]] = []

    def flush() -> Iterator[FileResult]:
        waves = [wave for _, wave, _ in pending if wave is not None]
        outputs = iter(predictor.run(waves, on_progress=bar.update) if waves else [])
        for path, wave, error in pending:
            if wave is None:
                yield FileResult(path, error=error)
            elif predictor.head == "ctc":
                yield FileResult(path, text=predictor.decode(next(outputs)))
            else:
                label, prob, _ = predictor.to_classification(next(outputs))
                yield FileResult(path, label=label, probability=prob)
        pending.clear()

    try:
        for path in paths:
            try:
                wave = load_audio(path)
                try:
                    predictor.windows(len(wave))
                except ValueError as e:
                    raise AudioError(path, str(e)) from e
                pending.append((path, wave, None))
            except AudioError as e:
                log.debug("skipping %s", e)
                bar.update(num_samples(path))
                pending.append((path, None, str(e)))
            loaded = sum(len(w) for _, w, _ in pending if w is not None)
            if len(pending) >= predictor.batch_size or loaded >= flush_samples:
                yield from flush()
        yield from flush()
    finally:
        bar.close()
