"""TFDS without TensorFlow: a prepared directory as an array_record TFDS data set, and back."""

import importlib.util

import numpy as np
import pytest

from data_pipelines import records, synthetic
from data_pipelines.pipeline import PipelineConfig, make_dataset
from data_pipelines.sources import PreparedSource
from xlsr_jax.tasks.ctc import CtcTargets
from xlsr_jax.tasks.pretraining import PretrainTargets
from data_pipelines.tfds_builder import TfdsAudioSource
from data_pipelines.vocab import Vocabulary
from xlsr_jax.config import Wav2Vec2Config

CONFIG = PipelineConfig(
    batch_size=4, min_sample_size=1600, max_sample_size=12000, num_buckets=2, read_threads=0
)


def test_tensorflow_is_not_installed():
    """What this file tests must hold on machines without TensorFlow."""
    assert importlib.util.find_spec("tensorflow") is None


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("prepared")
    utts = synthetic.synthetic_utterances(20, (0.2, 1.0), ("en", "de"), seed=4)
    synthetic.write_prepared_dir(d, {"train": utts[:16], "dev": utts[16:]}, codec="flac", num_shards=2)
    return d


def test_builder_round_trip_and_same_batches(prepared, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets", reason="the optional `tfds` extra is not installed")
    from data_pipelines.tfds_builder import prepared_builder

    builder = prepared_builder(prepared, tmp_path / "tfds")
    assert builder.info.file_format.value == "array_record"
    assert isinstance(builder.info.features["audio"], tfds.features.Tensor)
    assert builder.info.features["language"].names == ["de", "en"]
    sources = builder.as_data_source()
    assert {s: len(sources[s]) for s in sources} == {"train": 16, "dev": 4}

    ours = PreparedSource(prepared, "train")
    for i in range(len(ours)):
        example = sources["train"][i]
        utt = records.decode_record(ours.records[i])
        assert example["audio"].dtype == np.int16
        np.testing.assert_array_equal(example["audio"] / 32768.0, utt.audio)  # record i stays record i
        assert example["id"].decode() == utt.id and example["text"].decode() == utt.text
        assert example["language"] == ours.language_ids[i] and example["num_samples"] == ours.lengths[i]

    # The adapter feeds the TFDS source through the same pipeline: identical batches.
    adapted = TfdsAudioSource(
        sources["train"], language_key="language", languages=builder.info.features["language"].names
    )
    np.testing.assert_array_equal(adapted.lengths, ours.lengths)
    np.testing.assert_array_equal(adapted.language_ids, ours.language_ids)
    targets = PretrainTargets(Wav2Vec2Config(num_negatives=8))
    a, b = iter(make_dataset(adapted, CONFIG, targets)), iter(make_dataset(ours, CONFIG, targets))
    for _ in range(6):
        x, y = next(a), next(b)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])

    # Reopened from its directory alone (what a training job does), no prepared dir needed.
    reopened = tfds.builder_from_directory(builder.data_dir).as_data_source()["dev"]
    assert sorted(e["id"].decode() for e in reopened) == [f"utt{i:06d}" for i in range(16, 20)]


def test_adapter_handles_float_stereo_other_rates_and_string_languages():
    rng = np.random.default_rng(0)
    elements = [
        {
            "speech": rng.uniform(-0.5, 0.5, size=(n, 2)).astype(np.float32),
            "sentence": f"zz {n}".encode(),
            "locale": loc,
        }
        for n, loc in [(8000, b"fr"), (12000, b"en"), (9000, b"fr"), (16000, b"en")] * 2
    ]  # 8 kHz stereo float: 1-2 s
    source = TfdsAudioSource(
        elements, audio_key="speech", text_key="sentence", language_key="locale", sample_rate=8000
    )
    assert source.languages == ["en", "fr"] and source.language_ids.tolist() == [1, 0, 1, 0] * 2
    np.testing.assert_array_equal(source.lengths, [16000, 24000, 18000, 32000] * 2)
    ((wave, text),) = source.read([1])
    assert wave.dtype == np.float32 and wave.shape == (24000,) and text == "zz 12000"
    vocab = Vocabulary.from_texts(["zz 0123456789"])
    config = PipelineConfig(
        batch_size=2, min_sample_size=1600, max_sample_size=32000, read_threads=0, num_epochs=1
    )
    batches = list(make_dataset(source, config, CtcTargets(vocab)))
    assert len(batches) == 4
    for b in batches:
        for row in range(2):
            n = b["attention_mask"][row].sum()
            assert n in (16000, 24000, 18000, 32000)
            assert vocab.decode(b["labels"][row, : b["label_lengths"][row]]) == f"zz {n // 2}"


def test_builder_without_the_extra_says_how_to_install(monkeypatch, tmp_path):
    from data_pipelines import tfds_builder

    monkeypatch.setattr(tfds_builder, "tfds", None)
    with pytest.raises(ImportError, match=r"xlsr-jax\[tfds\]"):
        tfds_builder.prepared_builder(tmp_path, tmp_path / "out")
