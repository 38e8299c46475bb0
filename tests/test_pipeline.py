"""The grain pipeline: exact resume (state and Orbax), host sharding, buckets, crops, targets."""

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_pipelines import audio, records, synthetic
from data_pipelines.batching import bucket_lengths
from data_pipelines.pipeline import (
    PipelineConfig,
    make_dataset,
    make_plan,
    prepared_dataset,
)
from data_pipelines.sources import PreparedSource
from xlsr_jax.tasks.ctc import CtcTargets
from xlsr_jax.tasks.classification import LanguageTargets
from xlsr_jax.tasks.pretraining import PretrainTargets
from data_pipelines.vocab import LABEL_PAD, Vocabulary
from xlsr_jax.config import Wav2Vec2Config

MODEL = Wav2Vec2Config(num_negatives=20)
NUM_UTTS = 48  # divisible by every global batch used below (4, 6, 8, 12)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("prepared")
    utts = synthetic.synthetic_utterances(NUM_UTTS, (0.25, 1.5), ("de", "en", "fr"), seed=0)
    # Two records below min_sample_size (2400 samples): they must never appear.
    utts += synthetic.synthetic_utterances(2, (0.05, 0.1), ("en",), seed=1, start_index=NUM_UTTS)
    synthetic.write_prepared_dir(d, {"train": utts}, num_shards=3)
    return d


def _config(**kw):
    base = {
        "batch_size": 4,
        "min_sample_size": 2400,
        "max_sample_size": 16000,
        "num_buckets": 3,
        "read_threads": 0,
    }
    return PipelineConfig(**{**base, **kw})


def _markers(batch):
    """Record index of each row, from the first-sample marker (valid for uncropped rows)."""
    return np.round(batch["input_values"][:, 0] * 32768).astype(int) - 1


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_resume_from_state_is_exact(data_dir):
    """5 batches, save the state, restore into a new iterator: the next 9 equal the uninterrupted run's."""
    ds = prepared_dataset(data_dir, "train", _config(), PretrainTargets(MODEL), shard_index=1, shard_count=2)
    reference = _take(iter(ds), 14)  # crosses two window boundaries (6 global batches per window)
    it = iter(ds)
    _take(it, 5)
    state = it.get_state()
    fresh = iter(
        prepared_dataset(data_dir, "train", _config(), PretrainTargets(MODEL), shard_index=1, shard_count=2)
    )
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 9), reference[5:])


def test_resume_through_orbax_composite(data_dir, tmp_path):
    ds = prepared_dataset(data_dir, "train", _config(), PretrainTargets(MODEL), shard_index=0, shard_count=1)
    reference = _take(iter(ds), 10)
    it = iter(ds)
    _take(it, 4)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(
            4,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"step": np.array([4], np.int32)}),
                data=grain.checkpoint.CheckpointSave(it),
            ),
        )
        mngr.wait_until_finished()
    fresh = iter(
        prepared_dataset(data_dir, "train", _config(), PretrainTargets(MODEL), shard_index=0, shard_count=1)
    )
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(
            mngr.latest_step(),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore({"step": np.array([0], np.int32)}),
                data=grain.checkpoint.CheckpointRestore(fresh),
            ),
        )
    assert int(restored.state["step"][0]) == 4
    _assert_batches_equal(_take(restored.data, 6), reference[4:])


@pytest.mark.parametrize("hosts", [2, 3, 4])
def test_hosts_read_disjoint_parts_covering_each_epoch(data_dir, hosts):
    batch = 2
    config = _config(batch_size=batch, max_sample_size=10**6, num_epochs=2)  # no crop: markers survive
    per_epoch = NUM_UTTS // (batch * hosts)
    epochs = [[], []]
    shapes = []
    for h in range(hosts):
        batches = list(
            prepared_dataset(data_dir, "train", config, LanguageTargets(), shard_index=h, shard_count=hosts)
        )
        assert len(batches) == 2 * per_epoch  # finite epochs end
        for e in range(2):
            epochs[e].append(
                np.concatenate([_markers(b) for b in batches[e * per_epoch : (e + 1) * per_epoch]])
            )
        shapes.append([b["input_values"].shape for b in batches])
    for parts in epochs:
        union = np.concatenate(parts)
        assert (
            len(union) == len(set(union.tolist())) == NUM_UTTS
        )  # disjoint, nothing lost, short ones dropped
        assert set(union.tolist()) == set(range(NUM_UTTS))
    assert all(s == shapes[0] for s in shapes)  # every host pads step i to the same bucket
    assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))  # reshuffled per epoch


def test_global_batch_is_independent_of_host_count(data_dir):
    """Host rows of one step concatenate to the single-host batch with the same global batch size."""
    one = _take(
        iter(
            prepared_dataset(
                data_dir, "train", _config(batch_size=8), LanguageTargets(), shard_index=0, shard_count=1
            )
        ),
        7,
    )
    two = [
        _take(
            iter(
                prepared_dataset(
                    data_dir, "train", _config(batch_size=4), LanguageTargets(), shard_index=h, shard_count=2
                )
            ),
            7,
        )
        for h in range(2)
    ]
    for step in range(7):
        for key in one[step]:
            np.testing.assert_array_equal(
                one[step][key], np.concatenate([two[0][step][key], two[1][step][key]])
            )


def test_buckets_bound_shapes_and_masks_are_exact(data_dir):
    source = PreparedSource(data_dir, "train")
    config = _config(num_buckets=3, max_sample_size=10**6)
    batches = _take(iter(make_dataset(source, config, LanguageTargets())), 60)  # 5 epochs
    buckets = bucket_lengths(source.lengths[source.lengths >= 2400], 3, 320)
    assert {b["input_values"].shape for b in batches} == {(4, int(w)) for w in buckets}
    assert len(buckets) == 3 and (buckets % 320 == 0).all()
    in_own_bucket = []
    for b in batches:
        lengths = source.lengths[_markers(b)]
        np.testing.assert_array_equal(b["attention_mask"].sum(1), lengths)  # no utterance cut or padded into
        assert b["attention_mask"].dtype == np.int32
        for row, n in enumerate(lengths):
            assert b["attention_mask"][row, :n].all() and not b["input_values"][row, n:].any()
        own = buckets[np.searchsorted(buckets, lengths)]
        assert (own <= b["input_values"].shape[1]).all()
        in_own_bucket += (own == b["input_values"].shape[1]).tolist()
        np.testing.assert_array_equal(b["language_id"], source.language_ids[_markers(b)])
    # Only a bucket's leftover (< one global batch per window) moves up into the next bucket.
    assert np.mean(in_own_bucket) >= 0.85


def test_crops_are_seeded_per_record_and_epoch(data_dir):
    source = PreparedSource(data_dir, "train")
    config = _config(max_sample_size=8000)
    plan = make_plan(source, config, crop=True, shard_count=1)
    offsets = {}  # record -> crop offset of each epoch
    for i, b in enumerate(_take(iter(make_dataset(source, config, LanguageTargets())), 36)):  # 3 epochs
        assert b["input_values"].shape[1] <= 8000
        for row, rec in enumerate(plan.batch(i)[1]):
            full = records.decode_record(source.records[int(rec)]).audio
            n = b["attention_mask"][row].sum()
            assert n == min(len(full), 8000)
            crop = b["input_values"][row, :n]
            windows = np.lib.stride_tricks.sliding_window_view(full, 16)
            (start,) = np.flatnonzero((windows == crop[:16]).all(axis=1))[:1]
            np.testing.assert_array_equal(full[start : start + n], crop)
            offsets.setdefault(int(rec), []).append(int(start))
    assert set(offsets) == set(range(NUM_UTTS))  # the two short records are dropped
    assert all(len(o) == 3 for o in offsets.values())  # once per epoch
    long_records = [r for r in offsets if source.lengths[r] > 8000]
    assert long_records and all(offsets[r] == [0, 0, 0] for r in offsets if r not in long_records)
    assert sum(len(set(offsets[r])) > 1 for r in long_records) >= len(long_records) // 2  # new crop per epoch
    _assert_batches_equal(
        _take(iter(make_dataset(source, config, LanguageTargets())), 3),
        _take(iter(make_dataset(source, config, LanguageTargets())), 3),
    )


def test_pretraining_masks_and_negatives_are_valid_per_utterance(data_dir):
    ds = prepared_dataset(data_dir, "train", _config(), PretrainTargets(MODEL), shard_index=0, shard_count=1)
    for b in _take(iter(ds), 12):
        mask, negs = b["mask_time_indices"], b["sampled_negatives"]
        frames = MODEL.num_frames(b["input_values"].shape[1])
        assert mask.shape == (4, frames) and mask.dtype == bool
        assert negs.shape == (4, frames, MODEL.num_negatives) and negs.dtype == np.int32
        counts = mask.sum(1)
        assert (counts > 0).all()
        for row in range(4):
            real = MODEL.num_frames(b["attention_mask"][row].sum())
            assert not mask[row, real:].any()  # never a padding frame
            for t in np.flatnonzero(mask[row]):
                assert mask[row, negs[row, t]].all() and (negs[row, t] != t).all()


def test_pretraining_targets_do_not_depend_on_the_host_count(data_dir):
    """Masks and negatives are seeded per record occurrence: 1 host x 4 rows == 2 hosts x 2 rows."""
    one = _take(iter(prepared_dataset(data_dir, "train", _config(), PretrainTargets(MODEL), shard_index=0,
                                      shard_count=1)), 4)
    hosts = [_take(iter(prepared_dataset(data_dir, "train", _config(batch_size=2), PretrainTargets(MODEL),
                                         shard_index=i, shard_count=2)), 4) for i in range(2)]
    for step, full in enumerate(one):
        for key in ("input_values", "mask_time_indices", "sampled_negatives"):
            np.testing.assert_array_equal(full[key], np.concatenate([h[step][key] for h in hosts]), err_msg=key)


def test_normalize_matches_huggingface_normalization(data_dir):
    source = PreparedSource(data_dir, "train")
    b = next(iter(make_dataset(source, _config(normalize=True, max_sample_size=10**6), LanguageTargets())))
    plain = next(iter(make_dataset(source, _config(max_sample_size=10**6), LanguageTargets())))
    for row, m, raw in zip(b["input_values"], b["attention_mask"].astype(bool), plain["input_values"]):
        np.testing.assert_allclose(row[m], audio.normalize(raw[m]), rtol=1e-4, atol=1e-5)
        assert abs(row[m].mean()) < 1e-4 and abs(row[m].std() - 1) < 1e-3 and not row[~m].any()


def test_ctc_labels_and_long_records_dropped(data_dir):
    source = PreparedSource(data_dir, "train")
    texts = [records.decode_record(source.records[i]).text for i in range(len(source))]
    vocab = Vocabulary.from_texts(texts)
    config = _config(max_sample_size=16000, num_epochs=1)
    batches = list(make_dataset(source, config, CtcTargets(vocab)))
    seen = np.concatenate([_markers(b) for b in batches])
    expected = np.flatnonzero((source.lengths >= 2400) & (source.lengths <= 16000))
    assert len(expected) < NUM_UTTS  # some records are too long for CTC and were not cropped
    assert len(seen) == len(expected) // 4 * 4 and set(seen) <= set(expected.tolist())
    for b in batches:
        assert b.keys() == {"input_values", "attention_mask", "labels", "label_lengths", "lengths", "texts",
                            "language_id"}
        assert b["labels"].shape == (4, b["input_values"].shape[1] // 320)
        for row, rec in enumerate(_markers(b)):
            n = b["label_lengths"][row]
            assert vocab.decode(b["labels"][row, :n]) == texts[rec]
            assert (b["labels"][row, n:] == LABEL_PAD).all()


def test_worker_processes_give_the_same_batches_and_resume(data_dir):
    in_process = _take(
        iter(
            prepared_dataset(
                data_dir, "train", _config(), PretrainTargets(MODEL), shard_index=0, shard_count=1
            )
        ),
        8,
    )
    ds = prepared_dataset(
        data_dir, "train", _config(worker_count=2), PretrainTargets(MODEL), shard_index=0, shard_count=1
    )
    it = iter(ds)
    _assert_batches_equal(_take(it, 5), in_process[:5])
    state = it.get_state()
    fresh = iter(ds)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), in_process[5:])


def test_config_errors_are_clear(data_dir):
    with pytest.raises(ValueError, match="at least 2"):
        prepared_dataset(
            data_dir,
            "train",
            _config(min_sample_size=500),
            PretrainTargets(MODEL),
            shard_index=0,
            shard_count=1,
        )
    with pytest.raises(ValueError, match="fewer than one global batch"):
        prepared_dataset(
            data_dir, "train", _config(batch_size=32), LanguageTargets(), shard_index=0, shard_count=2
        )
    with pytest.raises(ValueError, match="num_epochs=None"):
        prepared_dataset(
            data_dir,
            "train",
            _config(language_alpha=0.5, num_epochs=1),
            LanguageTargets(),
            shard_index=0,
            shard_count=1,
        )
