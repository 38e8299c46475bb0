"""Does fine-tuning learn? Pretrain a small model on the embedded corpus, then language ID and CTC from it.

    python benchmarks/bench_finetune_learns.py --workdir /tmp/learns --pretrain-steps 100 \\
        --lid-steps 400 --ctc-steps 1000

The real loop on the embedded corpus (11 languages, 176 train / 44 dev clips of synthesized
speech): `experiments/pretrain_xlsr.py:smoke` widened to --hidden, exported, then
`finetune_lid.py:smoke` and `finetune_ctc.py:smoke` with `model.init_from` = that export. Reports
the first and last logged train loss, dev accuracy (LID; chance is 1/11) and dev CER/WER/blank ratio
(CTC; an all-blank model has CER 1.0 and blank ratio 1.0), and wall times. A CTC model sits on the
"all blank" plateau for the first several hundred steps at this size; that is why this is a
benchmark and not a CI test. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

from xlsr_jax.parallel.topology import quiet_libtpu

quiet_libtpu()

from xlsr_jax.cli import main as cli  # noqa: E402
from xlsr_jax.experiment import load_experiment  # noqa: E402
from xlsr_jax.train.loop import train_and_evaluate  # noqa: E402


def _run(experiment: str, workdir: pathlib.Path, steps: int, extra: list[str]) -> tuple[dict, float]:
    overrides = [f"--config.train.steps={steps}", f"--config.optim.total_steps={steps}",
                 f"--config.train.eval_every={steps}", f"--config.train.checkpoint_every={steps}",
                 f"--config.train.log_every={max(steps // 10, 1)}", *extra]
    t0 = time.perf_counter()
    result = train_and_evaluate(load_experiment(experiment, overrides), workdir)
    wall = time.perf_counter() - t0
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    row = {"first_loss": round(first, 3), "last_loss": round(last, 3), "wall_s": round(wall, 1)}
    if result.eval_history:
        row.update({k: round(v, 4) for k, v in result.eval_history[-1].items()
                    if k in ("accuracy", "cer", "wer", "blank_ratio", "loss")})
    return row, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--pretrain-steps", type=int, default=100)
    parser.add_argument("--lid-steps", type=int, default=400)
    parser.add_argument("--ctc-steps", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    root = pathlib.Path(args.workdir)
    size = [f"--config.model.overrides.hidden_size={args.hidden}",
            f"--config.model.overrides.intermediate_size={2 * args.hidden}"]
    rows = {}
    rows["pretrain"], _ = _run("experiments/pretrain_xlsr.py:smoke", root / "pre", args.pretrain_steps,
                               [*size, "--config.data.num_buckets=1"])
    model = root / "pre_model"
    if not model.exists():
        cli(["export", "--workdir", str(root / "pre"), "--output", str(model)])
    common = [f"--config.model.init_from={model}", f"--config.data.dir={root / 'pre' / 'data'}",
              f"--config.optim.peak_lr={args.lr}", "--config.model.overrides.mask_time_prob=0.0",
              "--config.model.overrides.mask_feature_prob=0.0", "--config.optim.freeze_encoder_steps=20",
              "--config.optim.phase_ratio=(0.05,0.75,0.2)"]
    rows["lid"], _ = _run("experiments/finetune_lid.py:smoke", root / "lid", args.lid_steps, common)
    rows["ctc"], _ = _run("experiments/finetune_ctc.py:smoke", root / "ctc", args.ctc_steps, common)
    print(f"{'stage':<10}{'steps':>7}{'first loss':>12}{'last loss':>11}{'dev metric':>34}{'wall s':>9}")
    steps = {"pretrain": args.pretrain_steps, "lid": args.lid_steps, "ctc": args.ctc_steps}
    for stage, row in rows.items():
        metric = ""
        if "accuracy" in row:
            metric = f"accuracy {row['accuracy']:.3f}"
        if "cer" in row:
            metric = f"CER {row['cer']:.3f} WER {row['wer']:.3f} blank {row['blank_ratio']:.2f}"
        print(f"{stage:<10}{steps[stage]:>7}{row['first_loss']:>12}{row['last_loss']:>11}{metric:>34}"
              f"{row['wall_s']:>9}")
    print(json.dumps({"hidden": args.hidden, "lr": args.lr, "steps": steps, **rows,
                      "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}))


if __name__ == "__main__":
    main()
