"""Multilingual temperature sampling: weights, realized proportions, per-language epochs."""

import numpy as np
import pytest

from data_pipelines import synthetic
from data_pipelines.pipeline import PipelineConfig, prepared_dataset
from data_pipelines.sampling import (
    MIX_RELATIVE_TOLERANCE,
    language_weights,
    mixed_stream,
    shuffled_stream,
)
from xlsr_jax.tasks.classification import LanguageTargets


def test_language_weights_follow_the_temperature_rule():
    counts = np.array([900, 90, 9, 1, 0])
    np.testing.assert_allclose(language_weights(counts, 1.0), [0.9, 0.09, 0.009, 0.001, 0])
    np.testing.assert_allclose(language_weights(counts, 0.0), [0.25, 0.25, 0.25, 0.25, 0])
    q = counts[:4] / 1000
    np.testing.assert_allclose(language_weights(counts, 0.5)[:4], np.sqrt(q) / np.sqrt(q).sum())
    with pytest.raises(ValueError):
        language_weights([0, 0], 0.5)


def test_realized_proportions_match_targets_over_a_long_sample():
    """50,000 draws: every language within 1% (relative) of its target, low-resource ones upsampled."""
    counts = {0: 5000, 1: 800, 2: 120, 3: 15}
    language_ids = np.concatenate([np.full(n, lang) for lang, n in counts.items()])
    records = np.arange(len(language_ids)) + 1000
    stream, target = mixed_stream(records, language_ids, seed=3, alpha=0.5)
    sample = np.array([stream[i] for i in range(50_000)])
    realized = np.bincount(language_ids[sample - 1000], minlength=4) / len(sample)
    np.testing.assert_allclose(realized, target, rtol=MIX_RELATIVE_TOLERANCE)
    natural = np.array(list(counts.values())) / sum(counts.values())
    assert realized[3] > 5 * natural[3] and realized[0] < natural[0]


def test_sampling_by_hours_gives_each_language_its_target_share_of_the_audio():
    """XLS-R weighs languages by hours: with clips 4x longer in one corpus, counting records would
    give that language 4x too little audio; by hours each language's audio share is its target."""
    rng = np.random.default_rng(0)
    counts = {0: 4000, 1: 1000, 2: 200}
    language_ids = np.concatenate([np.full(n, lang) for lang, n in counts.items()])
    mean_seconds = np.array([2.0, 8.0, 4.0])[language_ids]  # language 1: 4x longer clips
    lengths = (rng.uniform(0.5, 1.5, len(language_ids)) * mean_seconds * 16_000).astype(np.int64)
    trained = np.minimum(lengths, 160_000)  # 10 s crops: the audio a record contributes
    hours = np.bincount(language_ids, weights=lengths)
    target_audio = language_weights(hours, 0.5)
    stream, record_weights = mixed_stream(np.arange(len(lengths)), language_ids, seed=1, alpha=0.5,
                                          lengths=lengths, trained_lengths=trained)
    sample = np.array([stream[i] for i in range(60_000)])
    audio = np.bincount(language_ids[sample], weights=trained[sample], minlength=3)
    np.testing.assert_allclose(audio / audio.sum(), target_audio, rtol=0.03)
    realized_records = np.bincount(language_ids[sample], minlength=3) / len(sample)
    np.testing.assert_allclose(realized_records, record_weights, rtol=MIX_RELATIVE_TOLERANCE)
    # Counting records instead misses the target audio share of the long-clip language by far.
    by_records = language_weights(np.bincount(language_ids), 0.5)
    audio_by_records = by_records * np.bincount(language_ids, weights=trained) / np.bincount(language_ids)
    assert abs(audio_by_records[1] / audio_by_records.sum() - target_audio[1]) > 0.1


def test_each_language_is_an_epoch_wise_shuffle():
    language_ids = np.array([0] * 30 + [1] * 7)
    stream, _ = mixed_stream(np.arange(37), language_ids, seed=0, alpha=0.5)
    draws = [stream[i] for i in range(400)]
    small = [r for r in draws if language_ids[r] == 1]
    for e in range(len(small) // 7):
        assert sorted(small[e * 7 : (e + 1) * 7]) == list(range(30, 37))  # every record once per epoch
    assert small[:7] != small[7:14]  # and a new order each epoch


def test_shuffled_stream_is_seeded_and_reshuffles_each_epoch():
    a, b = shuffled_stream(np.arange(50), seed=1), shuffled_stream(np.arange(50), seed=1)
    first, second = [a[i] for i in range(50)], [a[i] for i in range(50, 100)]
    assert first == [b[i] for i in range(50)] and sorted(first) == sorted(second) == list(range(50))
    assert first != second and first != [shuffled_stream(np.arange(50), seed=2)[i] for i in range(50)]


def test_pipeline_language_proportions(tmp_path):
    """Through bucketing and batching, the language mix of the batches is the target mix."""
    utts = []
    for lang, n in (("en", 60), ("de", 15), ("sw", 5)):
        utts += synthetic.synthetic_utterances(n, (0.2, 0.6), (lang,), seed=len(utts), start_index=len(utts))
    synthetic.write_prepared_dir(tmp_path, {"train": utts}, num_shards=2)
    config = PipelineConfig(
        batch_size=8,
        min_sample_size=1600,
        max_sample_size=16000,
        num_buckets=2,
        language_alpha=0.5,
        read_threads=0,
    )
    it = iter(prepared_dataset(tmp_path, "train", config, LanguageTargets(), shard_index=0, shard_count=1))
    ids = np.concatenate([next(it)["language_id"] for _ in range(100)])  # 10 windows of 10 batches
    target = language_weights(np.bincount(np.array([0] * 15 + [1] * 60 + [2] * 5)), 0.5)  # de, en, sw
    realized = np.bincount(ids, minlength=3) / len(ids)
    np.testing.assert_allclose(realized, target, atol=0.005)
    assert realized[2] > 2 * 5 / 80  # Swahili upsampled from 6% to ~16%
