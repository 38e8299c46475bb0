"""Encoder compile time, compiled memory and throughput: scanned vs unrolled layers, remat policies.

    python benchmarks/bench_model.py --preset xlsr_1b --batch 2 --seconds 5 --no-run
    python benchmarks/bench_model.py --preset base --batch 2 --seconds 5

Compiles forward+backward of a CTC-style loss ahead of time from abstract inputs (nothing of the
model is allocated when --no-run), so large presets can be measured on a CPU machine. With run
enabled it also times steady-state steps and reports audio-seconds per second.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlsr_jax.config import get_preset
from xlsr_jax.models.heads import abstract_params, build_model, count_params, init_params


def _loss_fn(model):
    def loss(params, audio, mask):
        logits = model.apply({"params": params}, audio, mask).logits
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    return loss


def measure(preset: str, scan: bool, remat: str, batch: int, seconds: float, dtype: str, run: bool, steps: int):
    config = get_preset(preset, scan_layers=scan, remat_policy=remat, dtype=dtype)
    model = build_model(config, "ctc")
    samples = int(seconds * 16000)
    params_abs = nn.meta.unbox(abstract_params(config, "ctc"))
    audio_abs = jax.ShapeDtypeStruct((batch, samples), jnp.float32)
    mask_abs = jax.ShapeDtypeStruct((batch, samples), jnp.int32)
    step = jax.jit(jax.value_and_grad(_loss_fn(model)))
    t0 = time.perf_counter()
    lowered = step.lower(params_abs, audio_abs, mask_abs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    row = {
        "preset": preset, "scan": scan, "remat": remat, "dtype": dtype, "batch": batch, "seconds": seconds,
        "params": count_params(params_abs), "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
        "temp_gib": round(getattr(mem, "temp_size_in_bytes", 0) / 2**30, 3) if mem else None,
    }  # fmt: skip
    if run:
        params = init_params(config, "ctc")
        audio = jax.random.normal(jax.random.key(0), (batch, samples))
        mask = jnp.ones((batch, samples), jnp.int32)
        jax.block_until_ready(compiled(params, audio, mask))
        t0 = time.perf_counter()
        for _ in range(steps):
            out = compiled(params, audio, mask)
        jax.block_until_ready(out)
        dt = (time.perf_counter() - t0) / steps
        row["step_s"] = round(dt, 3)
        row["audio_s_per_s"] = round(batch * seconds / dt, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-run", dest="run", action="store_false", help="compile only")
    args = parser.parse_args()
    rows = [
        measure(args.preset, scan, remat, args.batch, args.seconds, args.dtype, args.run, args.steps)
        for scan, remat in [(True, "full"), (True, "none"), (False, "full"), (False, "none")]
    ]
    cols = ["preset", "scan", "remat", "params", "lower_s", "compile_s", "temp_gib"] + (
        ["step_s", "audio_s_per_s"] if args.run else [])
    print(" | ".join(f"{c:>13}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]!s:>13}" for c in cols))
    device = jax.devices()[0]
    print(json.dumps({"benchmark": "bench_model", "device": f"{device.platform}:{device.device_kind}",
                      "host": platform.processor() or platform.machine(), "rows": rows}))


if __name__ == "__main__":
    main()
