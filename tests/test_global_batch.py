"""Per-host numpy batches -> global sharded jax.Arrays on the 8 fake CPU devices."""

import jax
import numpy as np
import pytest
from compile_flags import FAST_COMPILE_FLAGS
from jax.sharding import PartitionSpec as P

from data_pipelines import synthetic
from xlsr_jax.parallel.global_batch import batch_shardings, to_global_batch
from data_pipelines.pipeline import PipelineConfig, prepared_dataset
from xlsr_jax.tasks.classification import LanguageTargets
from xlsr_jax.tasks.pretraining import PretrainTargets
from xlsr_jax.config import Wav2Vec2Config


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    d = tmp_path_factory.mktemp("prepared")
    synthetic.write_prepared_dir(d, {"train": synthetic.synthetic_utterances(16, (0.3, 0.8))})
    config = PipelineConfig(batch_size=8, min_sample_size=1600, max_sample_size=16000, read_threads=0)
    ds = prepared_dataset(
        d, "train", config, PretrainTargets(Wav2Vec2Config(num_negatives=5)), shard_index=0, shard_count=1
    )
    # `lengths` is host bookkeeping (audio seconds): the loop never sends it to the devices.
    return {k: v for k, v in next(iter(ds)).items() if k != "lengths"}


@pytest.mark.parametrize("shape", [(2, 2, 2), (8, 1, 1), (1, 4, 2)])
def test_batch_is_split_over_data_and_fsdp_and_replicated_over_tensor(cpu_devices, batch, shape):
    mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), devices=cpu_devices)
    ways = shape[0] * shape[1]
    out = to_global_batch(batch, mesh)
    assert out.keys() == batch.keys()
    for key, value in out.items():
        assert value.shape == batch[key].shape and value.dtype == batch[key].dtype
        assert value.sharding.spec[0] == ("data", "fsdp") and all(s is None for s in value.sharding.spec[1:])
        np.testing.assert_array_equal(np.asarray(value), batch[key])
        rows = batch[key].shape[0] // ways
        starts = {}
        for shard in value.addressable_shards:
            starts[shard.device] = shard.index[0].start or 0
            assert shard.data.shape[0] == rows
            np.testing.assert_array_equal(np.asarray(shard.data), batch[key][starts[shard.device] :][:rows])
        # Devices that differ only in their tensor coordinate hold the same rows.
        for i in range(shape[0]):
            for j in range(shape[1]):
                assert len({starts[d] for d in mesh.devices[i, j, :]}) == 1


def test_shardings_follow_the_rules_table(cpu_devices, batch):
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), devices=cpu_devices)
    rules = (("batch", "data"), ("samples", None), ("frames", None))
    specs = {k: s.spec for k, s in batch_shardings(batch, mesh, rules).items()}
    assert specs["input_values"] == P("data", None)
    assert specs["sampled_negatives"] == P("data", None, None)


def test_indivisible_local_batch_is_reported(cpu_devices, batch):
    mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"), devices=cpu_devices)
    with pytest.raises(ValueError, match="not divisible"):
        to_global_batch({k: v[:6] for k, v in batch.items()}, mesh)


_HOST = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
port, pid, data_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import numpy as np
from jax.experimental import multihost_utils
from xlsr_jax.parallel.global_batch import to_global_batch
from data_pipelines.pipeline import PipelineConfig, prepared_dataset
from xlsr_jax.tasks.classification import LanguageTargets
config = PipelineConfig(batch_size=4, min_sample_size=1600, max_sample_size=16000, read_threads=0)
it = iter(prepared_dataset(data_dir, "train", config, LanguageTargets()))  # shard = this JAX process
mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"))
batches = [to_global_batch(next(it), mesh) for _ in range(3)]
assert batches[0]["input_values"].shape[0] == 8 and not batches[0]["input_values"].is_fully_addressable
gathered = {f"{k}{i}": multihost_utils.process_allgather(b[k], tiled=True) for i, b in enumerate(batches) for k in b}
np.savez(out, **gathered)
jax.distributed.shutdown()
"""


def test_two_processes_assemble_the_single_host_batch(tmp_path, batch):
    """Two JAX processes (4 CPU devices each) feed their own rows: the global arrays are one host's batch."""
    import os
    import socket
    import subprocess
    import sys

    d = tmp_path / "prepared"
    synthetic.write_prepared_dir(d, {"train": synthetic.synthetic_utterances(24, (0.3, 0.8), ("en", "de"))})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE_FLAGS, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HOST, str(port), str(i), str(d), str(tmp_path / f"{i}.npz")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-3000:]
    config = PipelineConfig(batch_size=8, min_sample_size=1600, max_sample_size=16000, read_threads=0)
    it = iter(prepared_dataset(d, "train", config, LanguageTargets(), shard_index=0, shard_count=1))
    results = [np.load(tmp_path / f"{i}.npz") for i in range(2)]
    for step in range(3):
        expected = next(it)
        for key, value in expected.items():
            for r in results:
                np.testing.assert_array_equal(r[f"{key}{step}"], value)
