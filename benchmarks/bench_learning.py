"""Does our pretraining learn as well as Hugging Face's? The same small model, batches, masks and negatives.

    python benchmarks/bench_learning.py [--steps 600] [--eval-every 100] [--ctc-steps 600] [--seed 0] [--out DIR]

1. The embedded corpus (11 languages, espeak-ng) is prepared once; `experiments/pretrain_xlsr.py:smoke`
   (the tiny model, float32, no dropout) with fairseq's optimizer (no clipping, weight decay on every
   parameter) is the recipe, the same for both.
2. Ours: `xlsr-jax train`'s loop (`train_and_evaluate`), logging every step and evaluating the dev split.
3. Hugging Face: `transformers.Wav2Vec2ForPreTraining` (PyTorch), initialized with our step-0 parameters,
   trained with `torch.optim.AdamW` on the batches our input pipeline gives the loop (the same audio,
   span masks and sampled negatives, in the same order), the same learning-rate and Gumbel temperature
   schedules, and evaluated on the same dev batches. Only the Gumbel noise differs, unless
   `--shared-noise`: then PyTorch's quantizer takes our noise of each step and only arithmetic differs.
4. Both pretrained encoders get the same short CTC fine-tune (the demo's: a head on the frozen encoder,
   `xlsr_jax.demo.frozen_encoder_head`) and dev CER.

Prints a table (contrastive accuracy, codebook perplexity, loss at each evaluation) and one JSON line;
writes `learning.png` (needs the `bench` extra: matplotlib) and `learning.json` to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import tempfile
import time

import numpy as np


def contrastive_metrics(pred, target, mask, negatives, temperature: float) -> dict:
    """Loss (per masked frame), accuracy and the counts, as fairseq and `contrastive_loss` define them."""
    pred = pred / np.maximum(np.linalg.norm(pred, axis=-1, keepdims=True), 1e-8)
    target = target / np.maximum(np.linalg.norm(target, axis=-1, keepdims=True), 1e-8)
    sim = np.einsum("btd,bsd->bts", pred, target) / temperature
    positive = np.diagonal(sim, axis1=1, axis2=2)
    negative = np.take_along_axis(sim, negatives, axis=2)
    neg_targets = np.stack([target[b][negatives[b]] for b in range(len(target))])  # [B, T, K, D]
    neg_is_pos = np.all(neg_targets == target[:, :, None, :], axis=-1)
    negative = np.where(neg_is_pos, -np.inf, negative)
    logits = np.concatenate([positive[..., None], negative], axis=-1)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    correct = (logits.argmax(-1) == 0) & ~(logits.argmin(-1) == 0)
    masked = mask.astype(bool)
    n = max(int(masked.sum()), 1)
    return {"contrastive_loss": float(-log_probs[..., 0][masked].sum() / n),
            "accuracy": float(correct[masked].sum() / n), "num_masked": n}


def capture_gumbel_noise(noises: list) -> None:
    """Makes our quantizer hand every training step's Gumbel noise to the host, in step order."""
    import jax

    from xlsr_jax.models import quantizer

    draw = quantizer.gumbel_noise

    def noise_and_copy(key, shape):
        noise = draw(key, shape)
        jax.debug.callback(lambda n: noises.append(np.asarray(n)), noise, ordered=True)
        return noise

    quantizer.gumbel_noise = noise_and_copy


def inject_gumbel_noise(noises: list, cursor: dict) -> None:
    """Makes transformers' quantizer use `noises[cursor["step"]]` instead of its own draw: a hard
    straight-through softmax over (logits + noise) / tau, which is what `gumbel_softmax` computes."""
    import torch

    def gumbel_softmax(logits, tau, hard):
        assert hard
        noise = torch.from_numpy(noises[cursor["step"]].reshape(logits.shape))
        soft = torch.softmax((logits + noise) / tau, dim=-1)
        one_hot = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        return one_hot - soft.detach() + soft

    torch.nn.functional.gumbel_softmax = gumbel_softmax


def hf_tensors(batch):
    """A batch of our pipeline as `Wav2Vec2ForPreTraining`'s inputs (negatives as indices into the flattened batch)."""
    import torch

    frames = batch["mask_time_indices"].shape[1]
    offsets = (np.arange(len(batch["sampled_negatives"])) * frames)[:, None, None]
    return (torch.from_numpy(batch["input_values"]), torch.from_numpy(batch["attention_mask"]).long(),
            torch.from_numpy(batch["mask_time_indices"]).bool(),
            torch.from_numpy((batch["sampled_negatives"] + offsets).astype(np.int64)))


def hf_model(state_dict: dict, model_config):
    """`Wav2Vec2ForPreTraining` holding `state_dict` (ours through `params_to_state_dict`); every key must
    match, except HF's `masked_spec_embed` where ours has none."""
    import torch
    import transformers

    model = transformers.Wav2Vec2ForPreTraining(transformers.Wav2Vec2Config(**model_config.to_hf_dict()))
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, strict=False)
    if unexpected or [k for k in missing if "masked_spec_embed" not in k]:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model


def hf_dev_metrics(model, dev_batches, temperature: float) -> dict:
    """Dev accuracy, loss and code perplexity of a `Wav2Vec2ForPreTraining` (deterministic forward)."""
    import torch

    model.eval()
    rows = []
    with torch.no_grad():
        for batch in dev_batches:
            values, attention, mask, negatives = hf_tensors(batch)
            out = model(values, attention_mask=attention, mask_time_indices=mask, sampled_negative_indices=negatives)
            m = contrastive_metrics(out.projected_states.numpy(), out.projected_quantized_states.numpy(),
                                    batch["mask_time_indices"], batch["sampled_negatives"], temperature)
            m["loss"] = float(out.loss) / m["num_masked"]
            m["code_perplexity"] = float(out.codevector_perplexity)
            rows.append(m)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "num_masked"}


def cross_forward(program, dev_batches, model_dirs: dict) -> dict:
    """Each trained encoder through both forwards (our eval step, and HF's after `params_to_state_dict`) on
    the same dev batches: where the two forwards agree, a dev gap between the encoders is the training's."""
    import jax

    from xlsr_jax.convert.hf import params_to_state_dict
    from xlsr_jax.model_dir import load_model_dir

    config = program.model_config
    result = {}
    for name, path in model_dirs.items():
        _, _, params = load_model_dir(path)
        rows = [jax.device_get(program.eval_step(params, batch)) for batch in dev_batches]
        ours = {k: float(np.mean([r[k] for r in rows])) for k in ("accuracy", "loss", "code_perplexity")}
        model = hf_model(params_to_state_dict(jax.device_get(params), config, "pretraining"), config)
        hf = hf_dev_metrics(model, dev_batches, config.contrastive_logits_temperature)
        result[name] = {"ours": ours, "hf": {k: hf[k] for k in ours}}
    return result


def train_hf(init_sd, model_config, train_batches, dev_batches, config, eval_every: int, log, seed: int,
             noises: list | None = None) -> dict:
    import torch

    from xlsr_jax.objectives.contrastive import gumbel_temperature
    from xlsr_jax.train.optim import make_schedule

    torch.manual_seed(seed)
    model = hf_model(init_sd, model_config)
    o = config.optim
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    schedule = make_schedule(o)
    g = config.objective
    temp = model_config.contrastive_logits_temperature
    history, evals = [], []

    def evaluate(step):
        evals.append({"step": step, **hf_dev_metrics(model, dev_batches, temp)})
        model.train()

    cursor = {"step": 0}
    if noises is not None:
        if len(noises) != len(train_batches):
            raise RuntimeError(f"{len(noises)} noise draws captured for {len(train_batches)} steps")
        inject_gumbel_noise(noises, cursor)
    start = time.perf_counter()
    model.train()
    for step, batch in enumerate(train_batches):
        cursor["step"] = step
        for group in opt.param_groups:
            group["lr"] = float(schedule(step))
        model.set_gumbel_temperature(float(gumbel_temperature(step, g.gumbel_start, g.gumbel_floor, g.gumbel_decay)))
        values, attention, mask, negatives = hf_tensors(batch)
        out = model(values, attention_mask=attention, mask_time_indices=mask, sampled_negative_indices=negatives)
        num_masked = float(mask.sum())
        (out.loss / num_masked).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        m = contrastive_metrics(out.projected_states.detach().numpy(), out.projected_quantized_states.detach().numpy(),
                                batch["mask_time_indices"], batch["sampled_negatives"], temp)
        history.append({"step": step + 1, "loss": float(out.loss.detach()) / num_masked, "accuracy": m["accuracy"],
                        "prob_perplexity": float(out.codevector_perplexity)})
        if (step + 1) % eval_every == 0 or step + 1 == len(train_batches):
            evaluate(step + 1)
            log(f"hf step {step + 1}/{len(train_batches)} | loss {history[-1]['loss']:.3f} | "
                f"dev accuracy {evals[-1]['accuracy']:.3f} | {time.perf_counter() - start:.0f} s")
    return {"model": model, "history": history, "evals": evals, "seconds": time.perf_counter() - start}


def ctc_cer(init_dir: pathlib.Path, data_dir: pathlib.Path, workdir: pathlib.Path, steps: int) -> dict:
    from xlsr_jax.demo import experiment, frozen_encoder_head
    from xlsr_jax.evaluate import evaluate_model_dir
    from xlsr_jax.train.export import export_checkpoint
    from xlsr_jax.train.loop import train_and_evaluate

    config = experiment("finetune_ctc.py:smoke", [
        f"--config.model.init_from={init_dir}", f"--config.data.dir={data_dir}", f"--config.train.steps={steps}",
        f"--config.optim.total_steps={steps}", "--config.train.eval_every=0",
        f"--config.train.checkpoint_every={steps}", f"--config.train.log_every={max(1, steps // 4)}",
        *frozen_encoder_head(steps, "ctc")])
    train_and_evaluate(config, workdir / "run")
    model = export_checkpoint(workdir / "run", workdir / "model", overwrite=True)
    report = evaluate_model_dir(model, data_dir, "dev", batch_size=8, num_buckets=1, progress=False)
    return {k: report.metrics[k] for k in ("cer", "wer", "blank_ratio") if k in report.metrics}


def plot(ours_train, ours_eval, hf, path: pathlib.Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("loss", "accuracy", "prob_perplexity"),
                              ("train loss per masked frame", "contrastive accuracy", "codebook perplexity (soft)")):
        ax.plot([r["step"] for r in ours_train], [r[key] for r in ours_train], label="xlsr-jax (train)", alpha=0.6)
        ax.plot([r["step"] for r in hf["history"]], [r[key] for r in hf["history"]], label="Hugging Face (train)",
                alpha=0.6)
        if key == "accuracy":
            ax.plot([r["step"] for r in ours_eval], [r["accuracy"] for r in ours_eval], "o-", label="xlsr-jax (dev)")
            ax.plot([r["step"] for r in hf["evals"]], [r["accuracy"] for r in hf["evals"]], "s-",
                    label="Hugging Face (dev)")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--ctc-steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0, help="initial weights and Gumbel noise (the data is fixed)")
    parser.add_argument("--out", default="")
    parser.add_argument("--shared-noise", action="store_true",
                        help="Hugging Face's quantizer uses our Gumbel noise, step by step: only arithmetic differs")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="bench_learning_"))
    out.mkdir(parents=True, exist_ok=True)

    import jax

    from data_pipelines.corpus import corpus_dir
    from data_pipelines.ingest.prepare import prepare
    from data_pipelines.pipeline import prepared_dataset
    from data_pipelines.records import DatasetIndex
    from xlsr_jax.convert.hf import hf_to_jax, params_to_state_dict
    from xlsr_jax.demo import experiment
    from xlsr_jax.parallel.mesh import build_mesh, resolve_mesh_config
    from xlsr_jax.tasks import make_task
    from xlsr_jax.train.export import export_checkpoint
    from xlsr_jax.train.loop import model_config_from, pipeline_config, train_and_evaluate
    from xlsr_jax.train.program import build_program
    from xlsr_jax.train.state import create_train_state

    data = out / "data"
    if not (data / "dataset.json").is_file():
        prepare(corpus_dir(), data, workers=0, progress=False)
    steps = args.steps
    config = experiment("pretrain_xlsr.py:smoke", [
        f"--config.data.dir={data}", f"--config.train.steps={steps}", f"--config.optim.total_steps={steps}",
        f"--config.optim.warmup_steps={max(1, steps // 10)}", "--config.train.log_every=1",
        f"--config.train.eval_every={args.eval_every}", "--config.train.eval_batches=0",
        f"--config.train.checkpoint_every={steps}", "--config.data.num_buckets=1",
        "--config.optim.clip_norm=0.0", "--config.optim.decay_all_params=True",  # fairseq's and HF's optimizer
        f"--config.train.seed={args.seed}"])
    if jax.device_count() != 1:
        raise SystemExit("run on one device (the loop's batches are then exactly the ones given to PyTorch)")

    # The exact batches the loop consumes, and the dev batches its evaluation reads.
    mesh = build_mesh(resolve_mesh_config(config.mesh_preset, config.mesh))
    model_config = model_config_from(config)
    task = make_task(config, model_config, data, out)
    per_host = config.data.global_batch_size
    it = iter(prepared_dataset(data, config.data.train_split, pipeline_config(config, per_host, mesh=mesh),
                               task.train_targets, shard_index=0, shard_count=1))
    train_batches = [next(it) for _ in range(steps)]
    dev_records = DatasetIndex.load(data).splits[config.data.eval_split].total_records
    it = iter(prepared_dataset(data, config.data.eval_split, pipeline_config(config, per_host, 1000),
                               task.eval_targets, shard_index=0, shard_count=1))
    dev_batches = [next(it) for _ in range(math.ceil(dev_records / config.data.global_batch_size))]

    program = build_program(config, mesh, task)
    state, _ = create_train_state(program.model, program.optimizer, mesh, program.rules, seed=config.train.seed,
                                  shardings=program.state_shardings)
    init_sd = params_to_state_dict(jax.device_get(state.params), program.model_config, "pretraining")

    def log(line):
        print(line, file=sys.stderr, flush=True)

    start = time.perf_counter()
    run = out / "ours"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    noises = [] if args.shared_noise else None
    if noises is not None:
        capture_gumbel_noise(noises)
    train_and_evaluate(config, run)
    ours_seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ours_train = [r for r in rows if r.get("split") == "train"]
    ours_eval = [r for r in rows if r.get("split") == "eval"]
    log(f"ours: {steps} steps in {ours_seconds:.0f} s")

    hf = train_hf(init_sd, program.model_config, train_batches, dev_batches, config, args.eval_every, log, args.seed,
                  noises)
    hf_dir = out / "hf_pretrained"
    hf["model"].save_pretrained(hf_dir)

    ours_model = export_checkpoint(run, out / "models" / "ours", overwrite=True)
    hf_model = hf_to_jax(hf_dir, out / "models" / "hf")
    crossed = cross_forward(program, dev_batches, {"ours": ours_model, "hf": hf_model})
    ctc = {"ours": ctc_cer(ours_model, data, out / "ctc_ours", args.ctc_steps),
           "hf": ctc_cer(hf_model, data, out / "ctc_hf", args.ctc_steps)}

    header = f"{'step':>5} | {'ours dev acc':>12} {'HF dev acc':>10} | {'ours dev loss':>13} {'HF dev loss':>11} | " \
             f"{'ours code ppl':>13} {'HF code ppl':>11}"
    print(header)
    print("-" * len(header))
    hf_evals = {r["step"]: r for r in hf["evals"]}
    table = []
    for r in ours_eval:
        h = hf_evals.get(r["step"])
        if h is None:
            continue
        table.append({"step": r["step"], "ours": {k: r[k] for k in ("accuracy", "loss", "code_perplexity")},
                      "hf": {k: h[k] for k in ("accuracy", "loss", "code_perplexity")}})
        print(f"{r['step']:>5} | {r['accuracy']:>12.3f} {h['accuracy']:>10.3f} | {r['loss']:>13.3f} {h['loss']:>11.3f} "
              f"| {r['code_perplexity']:>13.2f} {h['code_perplexity']:>11.2f}")
    last = ours_train[-10:], hf["history"][-10:]
    train_tail = {name: {k: float(np.mean([r[k] for r in rows])) for k in ("loss", "accuracy", "prob_perplexity")}
                  for name, rows in zip(("ours", "hf"), last)}
    print(f"train, mean of the last 10 steps: ours {train_tail['ours']}, HF {train_tail['hf']}")
    print("the final encoders through both forwards (dev):")
    for weights, forwards in crossed.items():
        for forward, m in forwards.items():
            print(f"  {weights} weights, {forward} forward: accuracy {m['accuracy']:.5f} loss {m['loss']:.5f} "
                  f"code perplexity {m['code_perplexity']:.4f}")
    print(f"CTC head ({args.ctc_steps} steps on the frozen encoder), dev: ours {ctc['ours']}, HF {ctc['hf']}")
    png = out / "learning.png"
    plotted = plot(ours_train, ours_eval, hf, png)
    result = {"bench": "learning", "steps": steps, "seed": args.seed, "shared_noise": args.shared_noise, "model": "pretrain_xlsr.py:smoke (tiny)", "eval": table,
              "train_last10": train_tail, "cross_forward": crossed, "ctc": ctc, "seconds": {"ours": ours_seconds, "hf": hf["seconds"]},
              "plot": str(png) if plotted else None}
    print(json.dumps(result))
    result["train_curves"] = {"ours": [{k: r[k] for k in ("step", "loss", "accuracy", "prob_perplexity")}
                                       for r in ours_train], "hf": hf["history"]}
    (out / "learning.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
