"""Audio-budget batches (`data.max_tokens`): rows per bucket within a samples budget, static shapes,
every host the same rows, exact resume; and the loop turns `max_tokens` into that budget."""

import types

import ml_collections
import numpy as np
import pytest

from data_pipelines import synthetic
from data_pipelines.batching import budget_batch_sizes
from data_pipelines.pipeline import (PipelineConfig, batch_shapes, eval_batch_shapes, eval_dataset, make_plan,
                                     prepared_dataset)
from data_pipelines.sources import PreparedSource
from xlsr_jax.config import Wav2Vec2Config
from xlsr_jax.tasks.pretraining import PretrainTargets

MODEL = Wav2Vec2Config(num_negatives=10)


def _source(n=20_000, seed=0, languages=3):
    """Lengths from 1 s to 25 s (a 20 s crop makes the longest bucket 320000), languages of different lengths."""
    rng = np.random.default_rng(seed)
    language_ids = rng.integers(0, languages, n)
    # Language l's clips are (l + 1) times longer on average: corpora differ by 3x in clip length.
    lengths = (rng.uniform(16_000, 130_000, n) * (language_ids + 1)).astype(np.int64)
    return types.SimpleNamespace(lengths=lengths, language_ids=language_ids, __len__=lambda: n)


@pytest.mark.parametrize("alpha,sampling", [(None, "records"), (0.5, "records"), (0.5, "hours")])
def test_budget_batches_hold_the_audio_per_update_in_a_band(alpha, sampling):
    budget, multiple, hosts = 8 * 1_200_000, 8, 2
    config = PipelineConfig(batch_size=1, samples_per_batch=budget, batch_multiple=multiple, num_buckets=4,
                            language_alpha=alpha, language_sampling=sampling, window_batches=128)
    plan = make_plan(_source(), config, crop=True, shard_count=hosts)
    assert len(set(plan.batch_sizes.tolist())) == len(plan.buckets) >= 3  # a batch size per bucket
    positions, shapes = [], set()
    for i in range(3 * plan.window_batches):  # three windows
        pos, recs, padded = plan.batch(i)
        rows = len(recs)
        shapes.add((rows, padded))
        assert rows % multiple == 0 and rows % hosts == 0
        # The band: at most the budget, and short of it by less than one multiple of rows.
        assert budget - multiple * padded < rows * padded <= budget
        positions.append(pos)
    assert len(shapes) == len(plan.buckets)  # one program per bucket
    assert shapes == set(batch_shapes(_source(), config, crop=True, shard_count=hosts))  # what the loop compiles
    seen = np.concatenate(positions)
    distinct = np.unique(seen)
    # Nearly every record of the three windows is trained on, and nearly nothing twice.
    assert len(distinct) >= 0.98 * 3 * plan.window_records
    assert len(seen) - len(distinct) <= 0.02 * len(seen)


@pytest.mark.parametrize("crop_to_bucket", [False, True])
def test_batch_shapes_are_the_fixed_batches_shapes(crop_to_bucket):
    config = PipelineConfig(batch_size=4, num_buckets=3, crop_to_bucket=crop_to_bucket, window_batches=64)
    plan = make_plan(_source(2_000), config, crop=True, shard_count=2)
    seen = {(len(plan.batch(i)[1]), plan.batch(i)[2]) for i in range(2 * plan.window_batches)}
    assert seen == set(batch_shapes(_source(2_000), config, crop=True, shard_count=2))
    assert {rows for rows, _ in seen} == {8} and len(seen) == 3
    first = list(dict.fromkeys((len(plan.batch(i)[1]), plan.batch(i)[2]) for i in range(2)))
    assert batch_shapes(_source(2_000), config, crop=True, shard_count=2, max_batches=2) == first


def test_budget_rejects_a_budget_below_one_row_multiple():
    with pytest.raises(ValueError, match="at least 2560000"):
        budget_batch_sizes(np.array([160_000, 320_000]), 2_000_000, multiple=8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("budget")
    utts = synthetic.synthetic_utterances(60, (0.2, 2.0), ("de", "en"), seed=3)
    synthetic.write_prepared_dir(d, {"train": utts}, num_shards=2)
    return d


def _config(**kw):
    base = {"batch_size": 1, "min_sample_size": 2400, "max_sample_size": 32_000, "num_buckets": 3,
            "read_threads": 0, "samples_per_batch": 4 * 32_000, "batch_multiple": 2, "window_batches": 4}
    return PipelineConfig(**{**base, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("max_batches", [0, 3])
def test_eval_batch_shapes_are_the_evaluation_batches_shapes(data_dir, max_batches):
    config = PipelineConfig(batch_size=4, num_buckets=3, read_threads=0)
    source = PreparedSource(data_dir, "train")
    batches = list(eval_dataset(source, config, PretrainTargets(MODEL, seed=0), shard_index=1, shard_count=2))
    seen = dict.fromkeys((2 * len(b["input_values"]), b["input_values"].shape[1]) for b in batches[:max_batches or None])
    assert eval_batch_shapes(source, config, shard_count=2, max_batches=max_batches) == list(seen)
    # Length order: the first batches are the shortest, and need fewer programs than the whole split.
    assert len(seen) == 3 if not max_batches else 1 <= len(seen) < 3


def test_budget_pipeline_resumes_exactly_and_hosts_split_each_batch(data_dir):
    targets = PretrainTargets(MODEL)
    one = iter(prepared_dataset(data_dir, "train", _config(), targets, shard_index=0, shard_count=1))
    reference = _take(one, 14)  # several windows
    assert len({b["input_values"].shape[0] for b in reference}) >= 2  # batch size varies with the bucket
    for b in reference:
        assert b["input_values"].size <= 4 * 32_000

    it = iter(prepared_dataset(data_dir, "train", _config(), targets, shard_index=0, shard_count=1))
    _take(it, 5)
    state = it.get_state()
    fresh = iter(prepared_dataset(data_dir, "train", _config(), targets, shard_index=0, shard_count=1))
    fresh.set_state(state)
    for x, y in zip(_take(fresh, 9), reference[5:]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)

    halves = [_take(iter(prepared_dataset(data_dir, "train", _config(), targets, shard_index=h, shard_count=2)), 6)
              for h in range(2)]
    for step in range(6):
        for k in ("input_values", "attention_mask", "mask_time_indices", "sampled_negatives"):
            np.testing.assert_array_equal(np.concatenate([halves[0][step][k], halves[1][step][k]]),
                                          reference[step][k], err_msg=k)


def test_loop_turns_max_tokens_into_a_budget_per_batch_shard():
    from xlsr_jax.train.loop import pipeline_config

    config = ml_collections.ConfigDict({
        "data": {"seed": 0, "max_sample_size": 320_000, "min_sample_size": 32_000, "normalize": True,
                 "num_buckets": 3, "language_alpha": None, "worker_count": 0, "max_tokens": 1_200_000},
        "train": {"accum_steps": 2},
    })
    mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 4, "tensor": 2})
    p = pipeline_config(config, 16, mesh=mesh)
    assert p.samples_per_batch == 1_200_000 * 8 * 2 and p.batch_multiple == 16
    assert pipeline_config(config, 16).samples_per_batch == 0  # evaluation keeps fixed batches


def test_fit_compiles_the_longest_bucket_at_the_budgets_rows():
    import jax

    from xlsr_jax.experiment import load_experiment
    from xlsr_jax.train.fit import fit

    # The session's 8 fake devices (the API, not `fit --devices`, which must run before JAX starts)
    # x 3 crops of 48000 samples per device: 24 rows at the longest crop, not global_batch_size.
    config = load_experiment("experiments/pretrain_xlsr.py:smoke",
                             ["--config.data.max_tokens=144000", "--config.data.global_batch_size=8"])
    _, report = fit(config, devices=jax.devices())
    summary = report.summary()
    assert summary["global_batch"] == 24 and summary["num_samples"] == 48_000, summary
