"""Embed audio files with a model directory: one [frames, hidden] `.npy` per input file."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.audio import SAMPLE_RATE, AudioError, load_audio, normalize, pad_batch
from data_pipelines.errors import UserError
from xlsr_jax.model_dir import load_model_dir
from xlsr_jax.models.heads import Wav2Vec2Encoder

log = logging.getLogger(__name__)

# Padded lengths are rounded up to whole seconds so a folder of varied clips compiles a handful
# of programs, not one per file.
BUCKET_SAMPLES = SAMPLE_RATE


@dataclasses.dataclass
class EmbedReport:
    outputs: list[pathlib.Path]
    audio_seconds: float
    wall_seconds: float
    shapes: list[tuple[int, int]]

    @property
    def realtime_factor(self) -> float:
        return self.audio_seconds / max(self.wall_seconds, 1e-9)


def _output_names(paths: Sequence[pathlib.Path]) -> list[str]:
    names = [p.stem + ".npy" for p in paths]
    seen: dict[str, pathlib.Path] = {}
    for name, path in zip(names, paths):
        if name in seen:
            raise UserError(f"two inputs would both write {name}: {seen[name]} and {path}; rename one")
        seen[name] = path
    return names


def embed_files(
    model_dir: str | pathlib.Path,
    audio_paths: Sequence[str | pathlib.Path],
    output_dir: str | pathlib.Path,
    layer: int | None = None,
    batch_size: int = 8,
    dtype: str | None = None,
    progress: bool = True,
) -> EmbedReport:
    """Write `<stem>.npy` (float32 [frames, hidden]) for each file; returns paths, shapes and timing.

    `layer` indexes Hugging Face's `hidden_states` (0 = transformer input, num_hidden_layers = last
    layer's output; negative counts from the end); None takes the last hidden state. Files are read
    at any sample rate and channel count (mixed to mono, resampled to 16 kHz) and normalized when the
    model's config says `do_normalize`.
    """
    paths = [pathlib.Path(p) for p in audio_paths]
    if not paths:
        raise UserError("no audio files given")
    for p in paths:  # fail before any compute on a typo
        if not p.exists():
            raise AudioError(p, "no such file")
    names = _output_names(paths)
    overrides = {"dtype": dtype} if dtype else {}
    config, _, params = load_model_dir(model_dir, **overrides)
    num_states = config.num_hidden_layers + 1
    if layer is not None and not -num_states <= layer < num_states:
        raise UserError(f"--layer {layer} is out of range: this model has hidden_states 0..{num_states - 1}")
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    encoder = Wav2Vec2Encoder(config)
    variables = {"params": {"wav2vec2": params["wav2vec2"]}}

    @jax.jit
    def run(audio, mask):
        out = encoder.apply(variables, audio, mask, output_hidden_states=layer is not None)
        hidden = out.last_hidden_state if layer is None else out.hidden_states[layer]
        return hidden.astype(jnp.float32)

    # Group-norm (wav2vec 2.0 base) models normalize conv features over the whole padded length,
    # so padding changes their output: embed those one file at a time, unpadded.
    per_file = config.feat_extract_norm == "group"
    step = 1 if per_file else max(1, batch_size)
    order = sorted(range(len(paths)), key=lambda i: num_samples(paths[i]))  # similar lengths together
    outputs: list[pathlib.Path | None] = [None] * len(paths)
    shapes: list[tuple[int, int] | None] = [None] * len(paths)
    total_seconds = 0.0
    start = time.perf_counter()
    bar = _progress(len(paths), progress)
    for lo in range(0, len(order), step):
        idx = order[lo : lo + step]
        waves = [load_audio(paths[i]) for i in idx]
        if config.do_normalize:
            waves = [normalize(w) for w in waves]
        multiple = None if per_file else BUCKET_SAMPLES
        audio, mask = pad_batch(waves, pad_to_multiple_of=multiple)
        hidden = np.asarray(run(jnp.asarray(audio), jnp.asarray(mask)))
        for row, i in enumerate(idx):
            frames = int(config.num_frames(len(waves[row])))
            if frames < 1:
                raise AudioError(paths[i], f"too short: {len(waves[row])} samples make no frame")
            out_path = output_dir / names[i]
            np.save(out_path, hidden[row, :frames])
            outputs[i], shapes[i] = out_path, (frames, hidden.shape[-1])
            total_seconds += len(waves[row]) / SAMPLE_RATE
        bar.update(len(idx))
    bar.close()
    wall = time.perf_counter() - start
    return EmbedReport(outputs=outputs, audio_seconds=total_seconds, wall_seconds=wall, shapes=shapes)


def num_samples(path: pathlib.Path) -> int:
    """Samples the file will have at 16 kHz, from its header (0 when unreadable: loading reports why)."""
    import soundfile

    try:
        info = soundfile.info(str(path))
        return int(info.frames * SAMPLE_RATE / info.samplerate)
    except (RuntimeError, soundfile.LibsndfileError):  # load_audio reports it properly in its turn
        return 0


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", disable=not enabled or total < 2, desc="embed")
