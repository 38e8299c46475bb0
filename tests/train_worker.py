"""A training process for the SIGTERM test (not collected by pytest: no test_ prefix).

    python tests/train_worker.py WORKDIR DATA_DIR STEPS

Runs alone on 8 CPU devices and writes the final parameters to WORKDIR/params.npz.
(Multi-process runs start through the command line: tests/test_multihost_cli.py.)
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv):
    workdir, data_dir, steps = argv[0], argv[1], int(argv[2])
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np

    from xlsr_jax.experiment import load_experiment
    from xlsr_jax.train.loop import train_and_evaluate

    overrides = {"data.dir": data_dir, "train.steps": steps, "train.eval_every": 0, "train.log_every": 1,
                 "data.num_buckets": 1, "train.checkpoint_every": 2, "mesh_preset": "''",
                 "mesh.ici.data": 2, "mesh.ici.fsdp": -1, "mesh.dcn.data": 1}
    extra = os.environ.get("XLSR_TEST_OVERRIDES", "")
    config = load_experiment("experiments/pretrain_xlsr.py:smoke",
                             [f"--config.{k}={v}" for k, v in overrides.items()] + extra.split())
    result = train_and_evaluate(config, workdir)
    params = jax.tree_util.tree_leaves(result.state.params)
    # Gather to every process (each holds only its shards), then process 0 writes them.
    from jax.experimental import multihost_utils

    full = [np.asarray(multihost_utils.process_allgather(p, tiled=True)) for p in params]
    if jax.process_index() == 0:
        np.savez(os.path.join(workdir, "params.npz"), *full)
        losses = np.asarray([h["loss"] for h in result.history])
        np.save(os.path.join(workdir, "losses.npy"), losses)
    print(f"process {jax.process_index()} done at step {result.step} preempted={result.preempted}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
