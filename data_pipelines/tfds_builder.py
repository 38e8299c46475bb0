"""TFDS interop without TensorFlow (optional `tfds` extra: `pip install xlsr-jax[tfds]`).

- `PreparedSpeech`: a `GeneratorBasedBuilder` that republishes a prepared directory as a TFDS
  data set in `array_record` format; audio is `tfds.features.Tensor(shape=(None,), dtype=int16)`
  (`tfds.features.Audio` and `tfds.load` need TensorFlow). Read it with `builder.as_data_source()`.
- `TfdsAudioSource`: adapts any TFDS data source (or any random-access sequence of dicts) with an
  audio field to `sources.AudioSource`, so `pipeline.make_dataset` batches it like prepared shards.

Only `PreparedSpeech`/`prepared_builder` import tensorflow_datasets; the adapter needs nothing.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines import records
from data_pipelines.sources import PreparedSource, pcm16_payload

try:
    import tensorflow_datasets as tfds
except ImportError:  # the optional extra is not installed: the adapter still works
    tfds = None

_MISSING = "tensorflow-datasets is not installed: pip install 'xlsr-jax[tfds]'"


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


if tfds is not None:

    class PreparedSpeech(tfds.core.GeneratorBasedBuilder):
        """A prepared directory's splits as a TFDS data set (records keep their order and index)."""

        VERSION = tfds.core.Version("1.0.0")
        # tfds 4.9.10 looks for checksums beside the builder's module through `importlib_resources`,
        # which etils >= 1.15 no longer installs; this builder downloads nothing, so skip the lookup.
        code_path = None

        def __init__(self, *, prepared_dir: str | pathlib.Path, **kwargs):
            self._prepared_dir = pathlib.Path(prepared_dir)
            self._index = records.DatasetIndex.load(self._prepared_dir)
            kwargs.setdefault("file_format", "array_record")
            super().__init__(**kwargs)

        def _info(self):
            names = [code or "und" for code in self._index.languages] or ["und"]
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Speech prepared by xlsr-jax from {self._prepared_dir}",
                # Record i of the TFDS split is record i of the prepared split: same lengths, same plan.
                disable_shuffling=True,
                features=tfds.features.FeaturesDict(
                    {
                        "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),  # 16 kHz mono PCM
                        "id": tfds.features.Text(),
                        "text": tfds.features.Text(),
                        "language": tfds.features.ClassLabel(names=names),
                        "num_samples": tfds.features.Scalar(dtype=np.int32),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split) for split in self._index.splits}

        def _generate_examples(self, split: str):
            source = PreparedSource(self._prepared_dir, split)
            for i in range(len(source)):
                meta, payload = records.decode_metadata(source.records[i])
                pcm = pcm16_payload(meta, payload)
                yield (
                    i,
                    {
                        "audio": np.asarray(pcm, dtype=np.int16),
                        "id": meta["id"],
                        "text": meta.get("text", ""),
                        "language": int(source.language_ids[i]),
                        "num_samples": len(pcm),
                    },
                )


def prepared_builder(prepared_dir: str | pathlib.Path, data_dir: str | pathlib.Path, prepare: bool = True):
    """A `PreparedSpeech` builder writing under `data_dir`; generated on first use when `prepare`."""
    if tfds is None:
        raise ImportError(_MISSING)
    builder = PreparedSpeech(prepared_dir=prepared_dir, data_dir=str(data_dir))
    if prepare:
        builder.download_and_prepare()
    return builder


class TfdsAudioSource:
    """Any TFDS data source with an audio field as a pipeline `AudioSource`.

    Audio may be int16 PCM or float in [-1, 1], mono or [samples, channels] (averaged); other
    sample rates are resampled to 16 kHz with soxr. `language_key` may hold ClassLabel ints (name
    them with `languages`) or strings. Construction reads every example once for its length.
    """

    def __init__(
        self,
        data_source: Sequence[dict],
        audio_key: str = "audio",
        text_key: str | None = "text",
        language_key: str | None = None,
        languages: Sequence[str] | None = None,
        sample_rate: int = records.SAMPLE_RATE,
    ):
        self.data_source = data_source
        self.audio_key, self.text_key, self.sample_rate = audio_key, text_key, sample_rate
        # Bucketing needs every length up front: one pass over the data (TFDS decodes whole examples).
        native, values = [], []
        for i in range(len(data_source)):
            element = data_source[i]
            native.append(np.shape(element[audio_key])[0])
            if language_key is not None:
                values.append(element[language_key])
        self.lengths = self._resampled_length(np.asarray(native, np.int64))
        if language_key is None:
            self.languages, self.language_ids = [""], np.zeros(len(native), np.int32)
        elif languages is None and values and not isinstance(values[0], (int, np.integer)):
            self.languages = sorted({_text(v) for v in values})
            lookup = {code: i for i, code in enumerate(self.languages)}
            self.language_ids = np.asarray([lookup[_text(v)] for v in values], np.int32)
        else:  # ClassLabel ints
            self.language_ids = np.asarray(values, np.int32)
            count = int(self.language_ids.max()) + 1 if len(values) else 1
            self.languages = list(languages) if languages is not None else [str(i) for i in range(count)]

    def _resampled_length(self, n: np.ndarray) -> np.ndarray:
        if self.sample_rate == records.SAMPLE_RATE:
            return n
        return (n * records.SAMPLE_RATE) // self.sample_rate

    def __len__(self) -> int:
        return len(self.lengths)

    def _waveform(self, raw: Any, length: int) -> np.ndarray:
        wave = np.asarray(raw)
        if wave.ndim == 1 and wave.dtype == np.int16 and self.sample_rate == records.SAMPLE_RATE:
            return wave  # the pipeline crops int16 before converting: as fast as prepared shards
        scale = 1.0 / -np.iinfo(wave.dtype).min if np.issubdtype(wave.dtype, np.integer) else 1.0
        wave = wave.astype(np.float32) * np.float32(scale)
        if wave.ndim == 2:
            wave = wave.mean(axis=1)
        if self.sample_rate != records.SAMPLE_RATE:
            import soxr

            wave = soxr.resample(wave, self.sample_rate, records.SAMPLE_RATE, quality="HQ")
            wave = np.pad(wave, (0, max(0, length - len(wave))))[:length]  # exactly the planned length
        return np.ascontiguousarray(wave, dtype=np.float32)

    def read(self, indices: Sequence[int]) -> list[tuple[np.ndarray, str]]:
        indices = [int(i) for i in indices]
        getitems = getattr(self.data_source, "__getitems__", None)
        elements = getitems(indices) if getitems else [self.data_source[i] for i in indices]
        return [
            (
                self._waveform(e[self.audio_key], int(self.lengths[i])),
                _text(e[self.text_key]) if self.text_key else "",
            )
            for i, e in zip(indices, elements)
        ]
