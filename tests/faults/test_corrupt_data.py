"""Prepared data damaged after `prepare`: every case is one line naming the file, exit 2, before
anything compiles or is written."""

import json
import shutil

import pytest

from data_pipelines.corpus import corpus_dir
from data_pipelines.errors import UserError
from data_pipelines.ingest.prepare import prepare
from data_pipelines.records import DatasetIndex
from data_pipelines.sources import PreparedSource
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


def test_train_over_flipped_bytes_stops_with_one_line(prepared, tmp_path, capsys):
    data, split, shard = _damage(prepared, tmp_path, "flipped bytes")
    workdir = tmp_path / "run"
    code = main(["train", "--config", SMOKE, "--workdir", str(workdir), f"--config.data.dir={data}",
                 f"--config.data.train_split={split}", f"--config.data.eval_split={split}", "--config.train.steps=40",
                 "--config.train.checkpoint_every=1000", "--config.train.eval_every=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err[-5:]
    assert err[-1].startswith("xlsr-jax train: error:") and str(shard) in err[-1] and "cannot be read" in err[-1]
    assert "Traceback" not in "\n".join(err)
