"""Prepared data damaged after `prepare`: every case is one line naming the file, exit 2, before
anything compiles or is written; damage only reading a record can see (flipped bytes) is skipped
and counted up to `train.max_bad_records`, then stops the run the same way."""

import json
import logging
import shutil

import numpy as np

import pytest

from data_pipelines.corpus import corpus_dir
from data_pipelines.errors import UserError
from data_pipelines.ingest.prepare import prepare
from data_pipelines.records import DatasetIndex
from data_pipelines.pipeline import PipelineConfig, make_dataset
from data_pipelines.sources import PreparedSource, UnreadableRecordError
from xlsr_jax.cli import main

SMOKE = "experiments/pretrain_xlsr.py:smoke"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "prepared"
    prepare(corpus_dir(), out, workers=0, progress=False, num_shards=2)
    return out


def _damage(prepared, tmp_path, how):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    index = DatasetIndex.load(data)
    split = sorted(index.splits)[-1]
    shard = data / index.splits[split].shards[-1]
    if how == "missing shard":
        shard.unlink()
    elif how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif how == "empty shard":
        shard.write_bytes(b"")
    elif how == "index disagrees":
        raw = json.loads((data / "dataset.json").read_text())
        raw["splits"][split]["num_records"][-1] += 1
        (data / "dataset.json").write_text(json.dumps(raw))
    elif how == "flipped bytes":  # the file still opens and counts its records; riegeli's chunk hashes catch it
        raw = bytearray(shard.read_bytes())
        for pos in range(len(raw) // 4, len(raw), len(raw) // 4):
            raw[pos] ^= 0x55
        shard.write_bytes(bytes(raw))
    elif how == "corrupt dataset.json":
        (data / "dataset.json").write_bytes(b'{"codec": "pcm16", "splits": {\xff')
        shard = data / "dataset.json"
    return data, split, shard


CASES = {
    "missing shard": "shard missing",
    "truncated shard": "unreadable shard",
    "empty shard": "unreadable shard",
    "index disagrees": "records, but dataset.json says",
    "corrupt dataset.json": "is corrupt",
}


@pytest.mark.parametrize("how", list(CASES))
def test_damaged_data_is_named_at_start_up(how, prepared, tmp_path):
    data, split, bad_file = _damage(prepared, tmp_path, how)
    with pytest.raises(UserError, match=CASES[how]) as err:
        PreparedSource(data, split)
    assert str(bad_file) in str(err.value)


@pytest.mark.parametrize("how", ["missing shard", "truncated shard"])
def test_train_on_damaged_data_is_one_line(how, prepared, tmp_path, capsys):
    data, split, bad_file = _damage(prepared, tmp_path, how)
    workdir = tmp_path / "run"
    code = main(["train", "--config", SMOKE, "--workdir", str(workdir), f"--config.data.dir={data}",
                 f"--config.data.train_split={split}", f"--config.data.eval_split={split}", "--config.train.steps=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1].startswith("xlsr-jax train: error:") and str(bad_file) in err[-1] and CASES[how] in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (workdir / "checkpoints").exists()


def test_flipped_bytes_in_a_shard_name_the_shard_and_record_when_read(prepared, tmp_path):
    data, split, shard = _damage(prepared, tmp_path, "flipped bytes")
    source = PreparedSource(data, split)  # start-up cannot see it without reading every record
    with pytest.raises(UserError, match=r"record \d+ cannot be read \(Corrupted Riegeli") as err:
        for i in range(len(source)):
            source.read([i])
    assert str(shard) in str(err.value) and "run xlsr-jax prepare again" in str(err.value)


def _train_over_flipped_bytes(prepared, tmp_path, *overrides):
    data, split, shard = _damage(prepared, tmp_path, "flipped bytes")
    workdir = tmp_path / "run"
    # 40 steps of 8 rows read the 176-record split ~1.8 times: each of its 3 unreadable records at least once
    code = main(["train", "--config", SMOKE, "--workdir", str(workdir), f"--config.data.dir={data}",
                 f"--config.data.train_split={split}", f"--config.data.eval_split={split}", "--config.train.steps=40",
                 "--config.train.checkpoint_every=1000", "--config.train.eval_every=0", "--config.train.log_every=40",
                 *overrides])
    return code, workdir, shard


def test_train_with_max_bad_records_0_stops_at_the_first_with_one_line(prepared, tmp_path, capsys):
    code, _, shard = _train_over_flipped_bytes(prepared, tmp_path, "--config.train.max_bad_records=0")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err[-5:]
    assert err[-1].startswith("xlsr-jax train: error:") and str(shard) in err[-1] and "cannot be read" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_train_skips_and_counts_unreadable_records_then_stops_past_the_limit(prepared, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="data_pipelines.pipeline"):
        code, workdir, shard = _train_over_flipped_bytes(prepared, tmp_path, "--config.train.max_bad_records=2",
                                                         "--config.train.log_every=1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err[-5:]
    assert err[-1].startswith("xlsr-jax train: error: 3 unreadable training records")
    assert "train.max_bad_records=2" in err[-1] and "Traceback" not in "\n".join(err)
    skipped = [r.getMessage() for r in caplog.records if "skipping an unreadable training record" in r.getMessage()]
    assert len(skipped) == 3 and all(str(shard) in m for m in skipped)  # each one logged with its shard
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    counts = [m["bad_records"] for m in metrics]
    assert counts == sorted(counts) and counts[0] < 2 and counts[-1] == 2  # the first two were skipped and counted
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert metrics[-1]["step"] < 40


class _Source:
    """Six records of lengths 100..600 whose audio is the record's index; `bad` ones raise."""

    def __init__(self, bad):
        self.bad = set(bad)
        self.lengths = np.arange(1, 7) * 100
        self.language_ids = np.arange(6, dtype=np.int32)
        self.languages = [str(i) for i in range(6)]

    def __len__(self):
        return 6

    def read(self, indices):
        for i in indices:
            if int(i) in self.bad:
                raise UnreadableRecordError("shard-00000", int(i), RuntimeError("Corrupted"))
        return [(np.full(self.lengths[i], i, np.int16), f"text {i}") for i in indices]


class _NoTargets:
    crop = True

    def check(self, min_sample_size):
        pass

    def __call__(self, raw, rng):
        return dict(raw)


def _one_epoch(bad, skip):
    config = PipelineConfig(batch_size=6, min_sample_size=1, max_sample_size=600, num_buckets=1, pad_multiple=100,
                            num_epochs=1, skip_unreadable=skip)
    return list(make_dataset(_Source(bad), config, _NoTargets()))


def test_a_skipped_record_is_a_copy_of_a_readable_row_of_its_batch():
    (clean,) = _one_epoch(bad=(), skip=True)
    assert clean["bad_records"] == 0
    (batch,) = _one_epoch(bad=(2, 4), skip=True)
    assert batch["bad_records"] == 2 and batch["input_values"].shape == clean["input_values"].shape
    rec = clean["language_id"]  # the record in each row (ids equal record indices here)
    for row, r in enumerate(rec):
        want = row if r not in (2, 4) else max(i for i in range(row) if rec[i] not in (2, 4)) if any(
            rec[i] not in (2, 4) for i in range(row)) else min(i for i in range(6) if rec[i] not in (2, 4))
        assert batch["language_id"][row] == rec[want] and batch["texts"][row] == clean["texts"][want]
        np.testing.assert_array_equal(batch["input_values"][row], clean["input_values"][want])
        np.testing.assert_array_equal(batch["attention_mask"][row], clean["attention_mask"][want])
    assert set(batch["language_id"]) == set(rec) - {2, 4}


def test_unreadable_records_stop_the_pipeline_unless_skipping_and_a_batch_of_only_bad_rows_always_does():
    with pytest.raises(UnreadableRecordError, match="record 3 cannot be read"):
        _one_epoch(bad=(3,), skip=False)
    with pytest.raises(UnreadableRecordError, match="every other record of its batch"):
        _one_epoch(bad=range(6), skip=True)


def test_a_record_of_another_length_than_the_index_is_unreadable(prepared, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    split = sorted(DatasetIndex.load(data).splits)[-1]
    lengths = np.load(data / f"{split}.lengths.npy")
    lengths[5] += 320
    np.save(data / f"{split}.lengths.npy", lengths)
    source = PreparedSource(data, split)
    with pytest.raises(UnreadableRecordError, match=rf"record 5 cannot be read \({lengths[5] - 320} samples, the index"):
        source.read([4, 5])
