"""The TensorBoard event files of xlsr_jax.train.events, read back by TensorBoard's own reader."""

import struct
import subprocess
import sys

import numpy as np
import pytest

from xlsr_jax.train import events

PERSISTENT_COMPILE_CACHE = False  # no JAX here


def _scalars(directory):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_crc32c_matches_the_standard_check_value():
    assert events.crc32c(b"123456789") == 0xE3069283  # CRC-32C's published check value
    assert events.crc32c(b"") == 0


def test_tensorboard_reads_every_scalar_at_its_step(tmp_path):
    writer = events.EventWriter(tmp_path / "tb")
    rng = np.random.default_rng(0)
    written = {}
    for step in (1, 2, 10, 300, 2**40):
        row = {"train/loss": float(rng.normal()), "train/accuracy": float(rng.uniform())}
        writer.write(step, row)
        for tag, value in row.items():
            written.setdefault(tag, []).append((step, float(np.float32(value))))
    writer.write(5, {})  # nothing to write: no event
    writer.close()
    assert _scalars(tmp_path / "tb") == written


def test_object_store_files_are_rewritten_whole_and_roll_over(tmp_path, monkeypatch):
    monkeypatch.setattr(events, "ROLL_BYTES", 400)
    writer = events.EventWriter(tmp_path / "tb", rewrite=True)  # what a bucket gets, on a local directory
    for step in range(1, 21):
        writer.write(step, {"eval/cer": step / 100})
    files = sorted(p.name for p in (tmp_path / "tb").iterdir())
    assert len(files) > 2
    for path in (tmp_path / "tb").iterdir():
        assert path.stat().st_size <= 400
    assert _scalars(tmp_path / "tb") == {"eval/cer": [(s, float(np.float32(s / 100))) for s in range(1, 21)]}


def test_a_torn_last_record_loses_only_that_record(tmp_path):
    writer = events.EventWriter(tmp_path / "tb")
    for step in range(1, 4):
        writer.write(step, {"train/loss": float(step)})
    writer.close()
    (path,) = (tmp_path / "tb").iterdir()
    data = path.read_bytes()
    path.write_bytes(data[:-5])  # a process killed mid-write
    assert _scalars(tmp_path / "tb") == {"train/loss": [(1, 1.0), (2, 2.0)]}


def test_records_are_framed_with_masked_checksums():
    record = events.tfrecord(b"abc")
    (length,) = struct.unpack("<Q", record[:8])
    assert length == 3 and record[12:15] == b"abc" and len(record) == 8 + 4 + 3 + 4


def test_writing_events_imports_neither_torch_nor_tensorboardx():
    code = ("import sys, tempfile; from xlsr_jax.train.metrics import MetricsWriter; "
            "w = MetricsWriter(tempfile.mkdtemp(), 10); w.write(1, {'loss': 1.0}); w.close(); "
            "print(sorted(m for m in ('torch', 'tensorboardX', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("value", [0.0, -1.5, 3.0e38])
def test_values_round_trip_as_float32(tmp_path, value):
    writer = events.EventWriter(tmp_path)
    writer.write(7, {"x": value})
    writer.close()
    assert _scalars(tmp_path) == {"x": [(7, float(np.float32(value)))]}
