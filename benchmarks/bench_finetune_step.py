"""CTC fine-tuning step time with the encoder frozen (fairseq's freeze_finetune_updates) and unfrozen.

    python benchmarks/bench_finetune_step.py --preset base --batch 2 --seconds 5

Builds the train step exactly as `train` does (`build_program` on the finetune_ctc experiment with
`optim.freeze_encoder_steps`), compiles its two programs, then times steps while `state.step <
freeze_encoder_steps` with the frozen one (no backward pass through the encoder: only the CTC head is
differentiated) and after with the full one (full backward).
Before the frozen phase skipped the encoder's backward, every frozen step cost what an unfrozen
step costs, so the "unfrozen" column is also the old frozen-phase step time. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np

from xlsr_jax.experiment import load_experiment
from xlsr_jax.parallel.mesh import build_mesh, resolve_mesh_config
from xlsr_jax.tasks import make_task
from xlsr_jax.train.loop import model_config_from
from xlsr_jax.train.program import abstract_batch, build_program
from xlsr_jax.train.state import create_train_state


def _batch(program, batch: int, samples: int, vocab_size: int) -> dict:
    rng = np.random.default_rng(0)
    spec = abstract_batch(program, batch, samples)
    out = {}
    for key, s in spec.items():
        if key == "input_values":
            value = rng.standard_normal(s.shape).astype(np.float32)
        elif key == "attention_mask":
            value = np.ones(s.shape, np.int32)
        elif key == "labels":
            value = rng.integers(5, vocab_size, s.shape).astype(np.int32)
            value[:, s.shape[1] // 3:] = -100  # a transcript a third as long as the frames
        else:
            value = np.zeros(s.shape, s.dtype)
        out[key] = jax.device_put(value, s.sharding)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per phase (after one warm-up step)")
    args = parser.parse_args()
    frozen = args.steps + 1
    config = load_experiment("experiments/finetune_ctc.py:smoke", [
        f"--config.model.preset={args.preset}", f"--config.optim.freeze_encoder_steps={frozen}",
        f"--config.data.global_batch_size={args.batch}", "--config.model.overrides.mask_time_prob=0.0",
        "--config.model.overrides.mask_feature_prob=0.0", "--config.model.overrides.feature_grad_mult=0.0",
        "--config.optim.freeze_feature_encoder=True"])
    mesh = build_mesh(resolve_mesh_config(config.mesh_preset, config.mesh), jax.devices()[:1])
    task = make_task(config, model_config_from(config), None, None)
    program = build_program(config, mesh, task)
    state, _ = create_train_state(program.model, program.optimizer, mesh, program.rules,
                                  shardings=program.state_shardings)
    batch = _batch(program, args.batch, int(args.seconds * 16000), task.model_config.vocab_size)
    t0 = time.perf_counter()
    compiled = {phase: program.train_step.lower(state, batch, phase).compile() for phase in (True, False)}
    compile_s = time.perf_counter() - t0  # both programs: the frozen phase's and the full one
    times = {"frozen": [], "unfrozen": []}
    for i in range(2 * frozen):
        t0 = time.perf_counter()
        state, metrics = compiled[i < program.frozen_until](state, batch)
        jax.block_until_ready(metrics["loss"])
        phase = "frozen" if i < frozen else "unfrozen"
        if i not in (0, frozen):  # the first step of each phase warms up
            times[phase].append(time.perf_counter() - t0)
    row = {"preset": args.preset, "batch": args.batch, "seconds": args.seconds, "params": program.num_params,
           "compile_s": round(compile_s, 1),
           "frozen_step_s": round(statistics.median(times["frozen"]), 3),
           "unfrozen_step_s": round(statistics.median(times["unfrozen"]), 3),
           "machine": f"{platform.machine()} {jax.devices()[0].device_kind} x{jax.device_count()}"}
    row["speedup"] = round(row["unfrozen_step_s"] / row["frozen_step_s"], 2)
    print(f"{'preset':<10}{'batch x s':>10}{'frozen step s':>15}{'unfrozen step s':>17}{'speedup':>9}")
    print(f"{args.preset:<10}{args.batch:>5} x {args.seconds:<3g}{row['frozen_step_s']:>15}"
          f"{row['unfrozen_step_s']:>17}{row['speedup']:>9}")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
