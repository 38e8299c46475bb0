"""Storage running out during a checkpoint save: a one-line error naming the last committed step, that
checkpoint intact and restorable by a rerun, and saving again once space is freed."""

import contextlib
import os
import resource
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.errors import UserError
from xlsr_jax.train.checkpoint import Checkpointer, StorageFullError, abstract_with_shardings


@contextlib.contextmanager
def _tmpfs(path, size="4m"):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def _storage_full(root):
    """Fill the small tmpfs at `root` (root may mount, as on this project's machines); where mounting is
    not allowed, cap this process's file size instead, which fails the save's writes the same way."""
    if os.path.ismount(root):
        free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
        filler = root / "filler"
        filler.write_bytes(b"\0" * max(free - 64 * 1024, 0))
        try:
            yield "No space left on device"
        finally:
            filler.unlink()
    else:
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        try:
            yield "File too large"
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)


def test_a_full_disk_fails_the_save_keeps_the_last_checkpoint_and_recovers(tmp_path):
    state = {"w": jnp.arange(250_000, dtype=jnp.float32), "step": jnp.int32(1)}  # ~1 MB per checkpoint
    with _tmpfs(tmp_path / "disk") as mounted:
        directory = tmp_path / "disk" / "checkpoints"
        ckpt = Checkpointer(directory, keep=5)
        ckpt.save(1, state)
        ckpt.wait()
        with _storage_full(tmp_path / "disk") as reason:
            assert mounted == (reason == "No space left on device")
            with pytest.raises(StorageFullError) as err:
                ckpt.save(2, {"w": state["w"] + 1, "step": jnp.int32(2)})
                ckpt.wait()
        message = str(err.value)
        assert isinstance(err.value, UserError) and "\n" not in message  # the CLI's one line
        assert f"saving a checkpoint to {directory} failed: the storage is full" in message
        assert reason in message and "The last committed checkpoint, step 1, is intact" in message
        assert ckpt.latest_step() == 1

        # Space freed: the rerun restores step 1 exactly, saves again, and the torn save is gone.
        rerun = Checkpointer(directory, keep=5)
        assert rerun.latest_step() == 1
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = abstract_with_shardings(jax.eval_shape(lambda: state), {"w": device, "step": device})
        step, restored = rerun.restore(abstract)
        assert step == 1 and int(restored["step"]) == 1
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
        rerun.save(3, {"w": state["w"] + 3, "step": jnp.int32(3)})
        rerun.close()
        assert rerun.all_steps() == [1, 3]
        assert not [p for p in os.listdir(directory) if "tmp" in p]
