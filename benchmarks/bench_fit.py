"""Compiled per-chip memory of the pretraining presets on reference TPU pods, beside the analytic estimate.

    python benchmarks/bench_fit.py                       # 3 models x 5 pods (15 TPU compiles)
    python benchmarks/bench_fit.py --models xlsr_2b --pods v5e-256 --jsonl out.jsonl

Each row compiles `experiments/pretrain_xlsr.py:<model>` (20 s crops, bfloat16, its remat policy) with
the pod's mesh preset at a fixed global batch of 256 crops and no accumulation (`FIXED_BATCH`, the basis
of the BENCHMARKS.md table; the presets' own audio-budget batches are `--config.data.max_tokens=1200000
--config.train.accum_steps=N`), through the same code as `xlsr-jax fit` (the `tpu` extra is needed).
Prints a table row per compile, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

from xlsr_jax.parallel.topology import parse_topology, quiet_libtpu

# Pod -> (mesh preset, number of slices)
PODS = {
    "v4-128": ("v4-128", 1),
    "v5e-256": ("v5e-256", 1),
    "v5p-128": ("v5p-128", 1),
    "v6e-256": ("v6e-256", 1),
    "2x v5p-128": ("2x v5p-128", 2),
}
MODELS = ("xlsr_300m", "xlsr_1b", "xlsr_2b")
FIXED_BATCH = ["--config.data.max_tokens=0", "--config.train.accum_steps=1", "--config.data.global_batch_size=256"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--pods", nargs="+", default=list(PODS), choices=list(PODS))
    parser.add_argument("--jsonl", help="also append one JSON object per compile to this file")
    parser.add_argument("overrides", nargs="*", help="--config.a.b=value overrides for every row")
    args, unknown = parser.parse_known_args(argv)
    overrides = [a for a in unknown if a.startswith("--config.")] + args.overrides
    quiet_libtpu()
    from xlsr_jax.experiment import load_experiment
    from xlsr_jax.train.fit import fit

    header = (f"{'model':<10} {'pod':<11} {'mesh (data,fsdp,tensor)':<24} {'remat':<6} {'verdict':<12} {'peak GiB':>8} "
              f"{'HBM':>5} {'estimate':>8} {'ratio':>6} {'AG':>5} {'RS':>4} {'AR':>4} {'CP':>4} {'compile s':>9}")
    print(header)
    print("-" * len(header))
    rows = []
    for model in args.models:
        for pod in args.pods:
            preset, slices = PODS[pod]
            config = load_experiment(f"experiments/pretrain_xlsr.py:{model}",
                                     [f"--config.mesh_preset={preset}", *FIXED_BATCH, *overrides])
            topology = parse_topology(pod.split()[-1], num_slices=slices)
            _, report = fit(config, topology=topology)
            s = report.summary()
            s.update(model=model, pod=pod, remat=config.model.overrides.remat_policy)
            rows.append(s)
            c = s.get("collectives", {})
            mesh = ",".join(str(report.mesh[a]) for a in ("data", "fsdp", "tensor"))
            if slices > 1:
                mesh += f" x{slices} dcn"
            print(f"{model:<10} {pod:<11} {mesh:<24} {s['remat']:<6} {'FITS' if s['fits'] else 'DOES NOT FIT':<12} "
                  f"{s['peak_gib']:>8.2f} {s['hbm_gib']:>5.0f} {s.get('estimate_gib', 0):>8.2f} "
                  f"{s.get('compiled_over_estimate', 0):>6.2f} {c.get('all-gather', 0):>5} {c.get('reduce-scatter', 0):>4} "
                  f"{c.get('all-reduce', 0):>4} {c.get('collective-permute', 0):>4} {s['compile_s']:>9.1f}", flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(s) + "\n")
    print(json.dumps({"bench": "fit", "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
