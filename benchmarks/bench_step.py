"""One pretraining train step, ours against Hugging Face's PyTorch `Wav2Vec2ForPreTraining`: step time,
peak memory, and the time from process start to the first step.

    python benchmarks/bench_step.py [--preset base] [--seconds 5] [--batch 4] [--dtype float32]
        [--steps 6] [--rounds 2] [--post-ln] [--remat none] [--unrolled]

Each framework runs in its own process (`--worker ours|torch`), the two alternating for `--rounds`, so
neither inherits the other's memory or caches. A worker builds the model (base size, pre-LN and
layer-norm conv features like XLS-R unless `--post-ln`), AdamW (0.9, 0.98, 1e-6, weight decay 0.01),
one random batch of `--batch` x `--seconds` s with fairseq's span masks (0.65, length 10) and 100
negatives, then runs `--steps` train steps. Reported per process: seconds from process start to the
model being ready, compile (ours: lower + compile of the jitted step), the first step, the median and
min-max of the steady steps, and peak RSS. Prints a table with the medians over rounds and the ratios,
then one JSON line. Needs the `torch` extra for the PyTorch side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

START = time.perf_counter()


def _batch(config, batch: int, seconds: float):
    import numpy as np

    from xlsr_jax.objectives.masking import compute_span_mask, sample_negatives

    rng = np.random.default_rng(0)
    samples = int(seconds * 16000)
    audio = rng.standard_normal((batch, samples)).astype(np.float32)
    mask = np.ones((batch, samples), np.int32)
    frames = int(config.num_frames(samples))
    time_mask = compute_span_mask(frames, np.full(batch, frames), 0.65, 10, rng, min_masks=2)
    return {"input_values": audio, "attention_mask": mask, "mask_time_indices": time_mask,
            "sampled_negatives": sample_negatives(time_mask, 100, rng).astype(np.int32)}


def _config(args):
    from xlsr_jax.config import get_preset

    arch = {} if args.post_ln else {"do_stable_layer_norm": True, "feat_extract_norm": "layer", "conv_bias": True}
    return get_preset(args.preset, **arch, dtype=args.dtype, remat_policy=args.remat, scan_layers=not args.unrolled,
                      hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                      layerdrop=0.0, mask_time_prob=0.65)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker_ours(args) -> dict:
    import jax

    from xlsr_jax.models.heads import build_model
    from xlsr_jax.objectives.contrastive import ContrastiveObjective
    from xlsr_jax.parallel.mesh import build_mesh
    from xlsr_jax.parallel.rules import logical_sharding
    from xlsr_jax.tasks import pretraining
    from xlsr_jax.train.optim import make_optimizer
    from xlsr_jax.train.state import create_train_state
    from xlsr_jax.train.step import jit_train_step, make_train_step

    config = _config(args)
    mesh = build_mesh({"ici": {"data": 1, "fsdp": 1, "tensor": 1}}, jax.devices()[:1])
    model = build_model(config, "pretraining")
    optimizer, schedule = make_optimizer({"schedule": "polynomial", "peak_lr": 1e-4, "warmup_steps": 1,
                                          "total_steps": 1000, "weight_decay": 0.01, "clip_norm": 0.0})
    state, shardings = create_train_state(model, optimizer, mesh, seed=0)
    step = make_train_step(model, optimizer, schedule, ContrastiveObjective(), mesh=mesh,
                           param_shardings=shardings.params, sum_metrics=pretraining.SUM_METRICS)
    batch_sharding = logical_sharding(("batch",), mesh)
    jitted = jit_train_step(step, shardings, batch_sharding)
    batch = jax.device_put(_batch(config, args.batch, args.seconds), batch_sharding)
    jax.block_until_ready((state, batch))
    ready = time.perf_counter() - START
    t = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    return {"ready_s": ready, "compile_s": compile_s, "first_step_s": times[0], "steps_s": times[1:],
            "loss": float(metrics["loss"]), "peak_rss_gib": _peak_rss_gib()}


def worker_torch(args) -> dict:
    import numpy as np
    import torch
    import transformers

    config = _config(args)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForPreTraining(transformers.Wav2Vec2Config(**config.to_hf_dict())).train()
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    b = _batch(config, args.batch, args.seconds)
    frames = b["mask_time_indices"].shape[1]
    offsets = (np.arange(args.batch) * frames)[:, None, None]
    values = torch.from_numpy(b["input_values"])
    attention = torch.from_numpy(b["attention_mask"]).long()
    mask = torch.from_numpy(b["mask_time_indices"]).bool()
    negatives = torch.from_numpy((b["sampled_negatives"] + offsets).astype(np.int64))
    ready = time.perf_counter() - START
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(values, attention_mask=attention, mask_time_indices=mask, sampled_negative_indices=negatives)
        loss = out.loss / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"ready_s": ready, "compile_s": 0.0, "first_step_s": times[0], "steps_s": times[1:],
            "loss": float(loss.detach()), "peak_rss_gib": _peak_rss_gib()}


def _run_worker(name: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", name, *argv], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{name} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--remat", default="none")
    parser.add_argument("--unrolled", action="store_true", help="our layers unrolled instead of nn.scan")
    parser.add_argument("--post-ln", action="store_true", help="the original base model (post-LN, group norm)")
    parser.add_argument("--steps", type=int, default=6, help="per process: the first, then steady steps")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--frameworks", nargs="+", default=["ours", "torch"], choices=("ours", "torch"))
    parser.add_argument("--worker", choices=("ours", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker_ours(args) if args.worker == "ours" else worker_torch(args)
        print(json.dumps(result), flush=True)
        return 0
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step, then steady ones)")

    passthrough = [f"--preset={args.preset}", f"--seconds={args.seconds}", f"--batch={args.batch}",
                   f"--dtype={args.dtype}", f"--remat={args.remat}", f"--steps={args.steps}",
                   *(["--unrolled"] if args.unrolled else []), *(["--post-ln"] if args.post_ln else [])]
    runs: dict[str, list[dict]] = {name: [] for name in args.frameworks}
    for r in range(args.rounds):
        for name in args.frameworks:
            result = _run_worker(name, passthrough)
            runs[name].append(result)
            print(f"round {r + 1} {name}: median step {statistics.median(result['steps_s']):.2f} s, "
                  f"peak RSS {result['peak_rss_gib']:.2f} GiB", file=sys.stderr, flush=True)
    rows = {}
    for name, results in runs.items():
        steady = [t for res in results for t in res["steps_s"]]
        rows[name] = {
            "step_s_median": statistics.median(steady), "step_s_min": min(steady), "step_s_max": max(steady),
            "peak_rss_gib": statistics.median(res["peak_rss_gib"] for res in results),
            "ready_s": statistics.median(res["ready_s"] for res in results),
            "compile_s": statistics.median(res["compile_s"] for res in results),
            "first_step_s": statistics.median(res["first_step_s"] for res in results),
            "rounds": [{k: v for k, v in res.items()} for res in results],
        }
    header = f"{'framework':<10} {'step s median':>13} {'min-max':>13} {'peak RSS GiB':>12} {'ready s':>8} " \
             f"{'compile s':>9} {'first step s':>12} {'start->1st step s':>17}"
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        to_first = row["ready_s"] + row["compile_s"] + row["first_step_s"]
        print(f"{name:<10} {row['step_s_median']:>13.2f} {row['step_s_min']:>6.2f}-{row['step_s_max']:<6.2f} "
              f"{row['peak_rss_gib']:>12.2f} {row['ready_s']:>8.1f} {row['compile_s']:>9.1f} {row['first_step_s']:>12.1f} "
              f"{to_first:>17.1f}")
    ratios = {}
    if "ours" in rows and "torch" in rows:
        ratios = {"step_time_ours_over_torch": rows["ours"]["step_s_median"] / rows["torch"]["step_s_median"],
                  "peak_rss_ours_over_torch": rows["ours"]["peak_rss_gib"] / rows["torch"]["peak_rss_gib"]}
        print(f"ours / torch: step time {ratios['step_time_ours_over_torch']:.2f}x, "
              f"peak RSS {ratios['peak_rss_ours_over_torch']:.2f}x")
    print(json.dumps({"bench": "step", "config": {k: v for k, v in vars(args).items() if k != "worker"},
                      "cpus": os.cpu_count(), "results": rows, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
