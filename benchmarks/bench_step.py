"""One pretraining train step, ours against Hugging Face's PyTorch `Wav2Vec2ForPreTraining`: step time,
peak memory, and the time from process start to the first step.

    python benchmarks/bench_step.py [--preset base] [--seconds 5] [--batch 4] [--dtype float32]
        [--steps 6] [--rounds 2] [--post-ln] [--remat none] [--conv-remat] [--no-norm-act-remat]
        [--unrolled] [--attention auto]
        [--frameworks ours torch] [--flax-python PATH] [--compile-cache DIR] [--profile-top N]
        [--compile-profile N] [--keep-compiler-memory] [--huge-pages ours|all|none]
        [--queue DIR --queue-size N --label NAME]

Each framework runs in its own process (`--worker ours|torch`), the two alternating for `--rounds`, so
neither inherits the other's memory or caches. A worker builds the model (base size, pre-LN and
layer-norm conv features like XLS-R unless `--post-ln`), AdamW (0.9, 0.98, 1e-6, weight decay 0.01),
one random batch of `--batch` x `--seconds` s with fairseq's span masks (0.65, length 10) and 100
negatives, then runs `--steps` train steps. Reported per process: seconds from process start to the
model being ready, compile (ours: lower + compile of the jitted step), the first step, the median and
min-max of the steady steps, and peak RSS. On a GPU (JAX's default backend; PyTorch when CUDA is
available) also the device's peak allocated memory and the MFU: the analytic model FLOPs of
`xlsr_jax.train.metrics.train_flops_per_step`, the same for both frameworks, over the median step time
and the chip's peak bf16 FLOP/s. Prints a table with the medians over rounds and the ratios, then one
JSON line. Our worker runs with glibc's malloc asking for transparent huge pages, as the `xlsr-jax`
command runs, and hands the compiler's freed heap memory back before the first step, as the train loop
does (xlsr_jax/host_memory.py; `--keep-compiler-memory` skips that); `--huge-pages all` gives every
framework's worker the same huge pages, `none` none. Needs the `torch` extra for the PyTorch side.
With `--flax-python PATH` (a Python with transformers 4.57.6 and this machine's jax) also Hugging Face's
`FlaxWav2Vec2ForPreTraining`, with wav2vec 2.0's loss written here (the Flax model has none) and optax's
AdamW. With `--queue`, several runs of ours share one device: they compile side by side and are timed one
at a time (`benchmarks/sweep_step_gpu.sh`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import resource
import shutil
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
                      conv_remat=args.conv_remat, norm_act_remat=not args.no_norm_act_remat,
                      attention_impl=args.attention,
                      hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                      layerdrop=0.0, mask_time_prob=0.65)


@contextlib.contextmanager
def _device_turn(args):
    """With `--queue DIR`: mark this run compiled, wait until all `--queue-size` runs sharing the device are
    compiled (or failed), then hold the device alone (an exclusive lock) while timing. Compiles overlap on
    the host's cores, and no compile's autotuning runs on the GPU while another run is timed."""
    if not args.queue:
        yield
        return
    _queue_mark(args, "ready")
    deadline = time.monotonic() + 1800
    while len(_queue_done(args.queue)) < args.queue_size and time.monotonic() < deadline:
        time.sleep(0.5)
    with open(os.path.join(args.queue, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _queue_mark(args, state: str) -> None:
    os.makedirs(args.queue, exist_ok=True)
    open(os.path.join(args.queue, f"{state}.{args.label}"), "w").close()


def _queue_done(directory: str) -> set[str]:
    return {name.split(".", 1)[1] for name in os.listdir(directory) if name.startswith(("ready.", "failed."))}


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _model_flops(config, num_params: int, args) -> float:
    from xlsr_jax.train.metrics import train_flops_per_step

    return train_flops_per_step(config, num_params, args.batch, int(args.seconds * 16000))


# Model parts by the name-stack fragment their ops carry, first match wins.
_PARTS = (("conv_layers_0/", "feature encoder: conv 0 (16 kHz input)"),
          ("feature_extractor/", "feature encoder: conv 1-6"),
          ("feature_projection/", "feature projection"),
          ("pos_conv_embed/", "positional conv"),
          ("/attention/", "transformer: attention"),
          ("/feed_forward/", "transformer: feed-forward"),
          ("/encoder/", "transformer: norms, residuals, scan"),
          ("quantizer/", "quantizer"),
          ("project_", "project_q / project_hid"))


def _part(op_name: str) -> str:
    for fragment, part in _PARTS:
        if fragment in op_name:
            return part
    if "jvp(" in op_name:  # differentiated but outside the model: the objective
        return "loss (contrastive + diversity)"
    return "optimizer and the rest" if op_name else "(no name)"


def _traced(run, python_frames: bool = True):
    """`run()` under a `jax.profiler` trace: its result and the trace (`jax.profiler.ProfileData`)."""
    import glob
    import tempfile

    import jax
    from jax.profiler import ProfileData

    options = jax.profiler.ProfileOptions()
    if not python_frames:
        options.python_tracer_level = 0
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, profiler_options=options):
            result = run()
        return result, ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])


def _device_profile(compiled, run_step, steps: int, top: int) -> dict:
    """Kernel time per step on the device, by model part and by HLO op, from a `jax.profiler` trace.

    Each kernel event carries the HLO instruction it runs (`hlo_op`); the compiled HLO text maps that
    instruction to the JAX name stack it came from (`metadata={op_name=...}`).
    """
    import jax

    op_names = {m.group(1): m.group(2) for m in re.finditer(
        r"^\s*%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"", compiled.as_text(), re.M)}
    _, data = _traced(lambda: [run_step() for _ in range(steps)])
    platform = jax.devices()[0].platform
    by_op: dict[str, float] = {}
    for plane in data.planes:
        on_device = plane.name.startswith("/device:") and "CUSTOM" not in plane.name
        if not on_device and not (platform == "cpu" and plane.name == "/host:CPU"):
            continue
        lines = [line for line in plane.lines if line.name == "XLA Ops"] or list(plane.lines)
        for line in lines:
            for event in line.events:
                op = dict(event.stats).get("hlo_op")
                if op:
                    by_op[op] = by_op.get(op, 0.0) + event.duration_ns / 1e9 / steps
    by_part: dict[str, float] = {}
    for op, t in by_op.items():
        key = _part(op_names.get(op, ""))
        by_part[key] = by_part.get(key, 0.0) + t
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return {"kernel_s_per_step": sum(by_op.values()),
            "by_part": dict(sorted(by_part.items(), key=lambda kv: -kv[1])),
            "top_ops": [[op, t, op_names.get(op, "")[-160:]] for op, t in ops]}


def _compile_profile(lowered, top: int):
    """Compile `lowered` under a `jax.profiler` trace: the compiled step and the compiler's `top` phases by
    time summed over the threads that ran them (XLA's CPU backend compiles its kernels on a thread pool),
    as [name, seconds, events, threads], and the compiled program's fusions counted by model part."""
    # the compile runs in C++; Python's frames would only slow it
    compiled, data = _traced(lowered.compile, python_frames=False)
    phases: dict[str, list] = {}
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                row = phases.setdefault(event.name, [0.0, 0, set()])
                row[0] += event.duration_ns / 1e9
                row[1] += 1
                row[2].add(f"{plane.name}/{line.name}")
    ranked = sorted(phases.items(), key=lambda kv: -kv[1][0])[:top]
    fusions: dict[str, int] = {}  # the compiled program's fusions (each a kernel to generate) by model part
    for line in compiled.as_text().splitlines():
        if re.match(r"^\s*(ROOT )?%?[\w.\-]+ = .*? fusion\(", line):
            name = re.search(r'op_name="([^"]*)"', line)
            part = _part(name.group(1) if name else "")
            fusions[part] = fusions.get(part, 0) + 1
    return compiled, {"phases": [[name, t, n, len(threads)] for name, (t, n, threads) in ranked],
                      "fusions_by_part": dict(sorted(fusions.items(), key=lambda kv: -kv[1]))}


def worker_ours(args) -> dict:
    import jax

    from xlsr_jax.host_memory import release_free_memory
    from xlsr_jax.models.encoder import attention_kernel
    from xlsr_jax.models.heads import build_model
    from xlsr_jax.objectives.contrastive import ContrastiveObjective
    from xlsr_jax.parallel.mesh import build_mesh
    from xlsr_jax.parallel.rules import logical_sharding
    from xlsr_jax.tasks import pretraining
    from xlsr_jax.train.optim import make_optimizer
    from xlsr_jax.train.state import create_train_state
    from xlsr_jax.train.metrics import device_peak_flops
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
    lowered = jitted.lower(state, batch)
    lower_s = time.perf_counter() - t
    if args.compile_profile:
        compiled, compile_phases = _compile_profile(lowered, args.compile_profile)
    else:
        compiled, compile_phases = lowered.compile(), None
    compile_s = time.perf_counter() - t
    if not args.keep_compiler_memory:
        release_free_memory()  # as the train loop does before a program's first run
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    memory = compiled.memory_analysis()
    temp_gib = getattr(memory, "temp_size_in_bytes", 0) / 2**30 if memory is not None else None
    with _device_turn(args):
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t)
        device = jax.devices()[0]
        stats = device.memory_stats() if device.platform != "cpu" else None

        def run_step():
            nonlocal state
            state, out = compiled(state, batch)
            jax.block_until_ready((state, out))

        profile = _device_profile(compiled, run_step, 2, args.profile_top) if args.profile_top else None
    return {"profile": profile, "attention": attention_kernel(config, deterministic=False), "compiled_temp_gib": temp_gib,
            "compile_phases": compile_phases, "ready_s": ready, "lower_s": lower_s, "compile_s": compile_s, "first_step_s": times[0], "steps_s": times[1:],
            "loss": float(metrics["loss"]), "peak_rss_gib": _peak_rss_gib(), "device": device.device_kind,
            "device_peak_gib": stats["peak_bytes_in_use"] / 2**30 if stats else None,
            "num_params": num_params, "flops_per_step": _model_flops(config, num_params, args),
            "peak_flops": device_peak_flops(device)}


def worker_torch(args) -> dict:
    import numpy as np
    import torch
    import transformers

    from xlsr_jax.train.metrics import PEAK_FLOPS

    config = _config(args)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    with device:  # initialized where it trains: a 1B model's init on the host takes longer than its steps
        model = transformers.Wav2Vec2ForPreTraining(transformers.Wav2Vec2Config(**config.to_hf_dict())).train()
    model.to(device)  # masked_spec_embed is made by torch.Tensor(...), which ignores the device context
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    b = _batch(config, args.batch, args.seconds)
    frames = b["mask_time_indices"].shape[1]
    offsets = (np.arange(args.batch) * frames)[:, None, None]
    values = torch.from_numpy(b["input_values"]).to(device)
    attention = torch.from_numpy(b["attention_mask"]).long().to(device)
    mask = torch.from_numpy(b["mask_time_indices"]).bool().to(device)
    negatives = torch.from_numpy((b["sampled_negatives"] + offsets).astype(np.int64)).to(device)
    ready = time.perf_counter() - START
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(values, attention_mask=attention, mask_time_indices=mask, sampled_negative_indices=negatives)
        loss = out.loss / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    num_params = sum(p.numel() for p in model.parameters())
    return {"ready_s": ready, "compile_s": 0.0, "first_step_s": times[0], "steps_s": times[1:],
            "loss": float(loss.detach()), "peak_rss_gib": _peak_rss_gib(), "device": name,
            "device_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "num_params": num_params, "flops_per_step": _model_flops(config, num_params, args),
            "peak_flops": next((v for k, v in PEAK_FLOPS.items() if name.startswith(k)), None)}


def worker_flax(args) -> dict:
    """Hugging Face's `FlaxWav2Vec2ForPreTraining` (transformers <= 4.57, the last with Flax models).

    The model gives projected states, projected quantized states and the codebook perplexity; the loss is
    wav2vec 2.0's (the contrastive term over the same sampled negatives, summed over masked frames, plus
    0.1 x the diversity term), written here because transformers' Flax model has none. One device, AdamW
    from optax with the same settings, the whole step jitted with the state donated.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import transformers

    from xlsr_jax.train.metrics import device_peak_flops

    config = _config(args)
    hf_config = transformers.Wav2Vec2Config(**config.to_hf_dict())
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = transformers.FlaxWav2Vec2ForPreTraining(hf_config, seed=0, dtype=dtype)
    optimizer = optax.adamw(1e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01)
    b = _batch(config, args.batch, args.seconds)
    batch_size, frames, num_negatives = b["sampled_negatives"].shape
    offsets = (np.arange(batch_size) * frames)[:, None, None]
    batch = {"input_values": jnp.asarray(b["input_values"]), "attention_mask": jnp.asarray(b["attention_mask"]),
             "mask_time_indices": jnp.asarray(b["mask_time_indices"]),
             "negatives": jnp.asarray((b["sampled_negatives"] + offsets).reshape(-1))}
    num_codevectors = hf_config.num_codevectors_per_group * hf_config.num_codevector_groups

    def loss_fn(params, batch, rng):
        out = model(batch["input_values"], attention_mask=batch["attention_mask"],
                    mask_time_indices=batch["mask_time_indices"], gumbel_temperature=2.0, params=params,
                    dropout_rng=rng, gumbel_rng=rng, train=True)
        quantized = out.projected_quantized_states.astype(jnp.float32)
        states = out.projected_states.astype(jnp.float32)
        dim = quantized.shape[-1]
        negatives = quantized.reshape(-1, dim)[batch["negatives"]].reshape(batch_size, frames, num_negatives, dim)
        targets = jnp.concatenate([quantized[:, :, None], negatives], axis=2)  # [B, T, 1 + K, D]
        logits = optax.cosine_similarity(states[:, :, None], targets) / hf_config.contrastive_logits_temperature
        same = jnp.all(quantized[:, :, None] == negatives, axis=-1)
        logits = jnp.where(jnp.concatenate([jnp.zeros_like(same[..., :1]), same], axis=-1), -1e9, logits)
        mask = batch["mask_time_indices"].astype(jnp.float32)
        contrastive = (-jax.nn.log_softmax(logits, axis=-1)[..., 0] * mask).sum()
        diversity = (num_codevectors - out.codevector_perplexity) / num_codevectors
        return (contrastive + hf_config.diversity_loss_weight * diversity * mask.sum()) / mask.sum()

    def train_step(params, opt_state, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = model.params
    opt_state = optimizer.init(params)
    rng = jax.random.PRNGKey(0)
    jax.block_until_ready((params, opt_state, batch))
    ready = time.perf_counter() - START
    t = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, batch, rng).compile()
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, batch, rng)
        jax.block_until_ready((params, opt_state, loss))
        times.append(time.perf_counter() - t)
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    num_params = sum(x.size for x in jax.tree.leaves(params))
    return {"ready_s": ready, "compile_s": compile_s, "first_step_s": times[0], "steps_s": times[1:],
            "loss": float(loss), "peak_rss_gib": _peak_rss_gib(), "device": device.device_kind,
            "device_peak_gib": stats["peak_bytes_in_use"] / 2**30 if stats else None,
            "num_params": num_params, "flops_per_step": _model_flops(config, num_params, args),
            "peak_flops": device_peak_flops(device), "transformers": transformers.__version__}


def _malloc_env(huge: bool) -> dict[str, str]:
    """A worker's GLIBC_TUNABLES: malloc asking for huge pages as the `xlsr-jax` command does, or glibc's default."""
    from xlsr_jax.host_memory import HUGETLB_TUNABLE, glibc_version, huge_pages_env, thp_mode

    if HUGETLB_TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return {}  # set by hand: every worker runs under it
    env = huge_pages_env(dict(os.environ), glibc_version(), thp_mode()) if huge else None
    return {"GLIBC_TUNABLES": env["GLIBC_TUNABLES"]} if env else {}


def _run_worker(name: str, argv: list[str], env: dict | None = None, python: str = sys.executable) -> dict:
    proc = subprocess.run([python, __file__, "--worker", name, *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
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
    parser.add_argument("--conv-remat", action="store_true", help="ours: conv_remat (the conv encoder's norms and "
                        "activations recomputed in the backward pass)")
    parser.add_argument("--no-norm-act-remat", action="store_true",
                        help="ours: norm_act_remat=False (autodiff keeps the norms' and activations' "
                             "intermediates)")
    parser.add_argument("--attention", default="auto", help="ours: attention_impl (auto, xla, cudnn)")
    parser.add_argument("--unrolled", action="store_true", help="our layers unrolled instead of nn.scan")
    parser.add_argument("--post-ln", action="store_true", help="the original base model (post-LN, group norm)")
    parser.add_argument("--steps", type=int, default=6, help="per process: the first, then steady steps")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile-cache", metavar="DIR",
                        help="ours: JAX's persistent compilation cache in DIR, emptied first, so that round 1 "
                             "starts cold and later rounds start as a restarted job does")
    parser.add_argument("--profile-top", type=int, default=0, metavar="N",
                        help="ours: after the timed steps, trace 2 more and print the kernel time per step by "
                             "model scope and the N slowest HLO ops. The worker then runs with XLA's GPU command "
                             "buffers (CUDA graphs) off, so that each kernel keeps its HLO op's name: on the H200 "
                             "that made the xlsr_300m step ~6 %% slower")
    parser.add_argument("--compile-profile", type=int, default=0, metavar="N",
                        help="ours: compile under a jax.profiler trace and print the compiler's N longest phases, "
                             "summed over the threads that ran them (the trace adds to the compile time)")
    parser.add_argument("--keep-compiler-memory", action="store_true",
                        help="ours: skip handing the compiler's freed heap memory back before the first step "
                             "(the train loop hands it back: xlsr_jax.host_memory.release_free_memory)")
    parser.add_argument("--huge-pages", default="ours", choices=("ours", "all", "none"),
                        help="which workers run with glibc's malloc asking for transparent huge pages: ours, as "
                             "the xlsr-jax command runs (xlsr_jax/host_memory.py), every framework's, or none")
    parser.add_argument("--frameworks", nargs="+", default=["ours", "torch"], choices=("ours", "torch", "flax"))
    parser.add_argument("--flax-python", metavar="PATH",
                        help="a Python with transformers 4.57.6 (the last release with Flax wav2vec2) and the same "
                             "jax, e.g. a venv made with --system-site-packages: adds Hugging Face's "
                             "FlaxWav2Vec2ForPreTraining to the frameworks")
    parser.add_argument("--queue", metavar="DIR",
                        help="ours: share the device with other runs given the same DIR (benchmarks/sweep_step_gpu.sh): "
                             "compile alongside them, then time alone, once all --queue-size runs have compiled")
    parser.add_argument("--queue-size", type=int, default=1)
    parser.add_argument("--label", default="", help="a name for this run in the table and the JSON line")
    parser.add_argument("--worker", choices=("ours", "torch", "flax"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = {"ours": worker_ours, "torch": worker_torch, "flax": worker_flax}[args.worker](args)
        print(json.dumps(result), flush=True)
        return 0
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step, then steady ones)")
    if args.flax_python and "flax" not in args.frameworks:
        args.frameworks.append("flax")
    if "flax" in args.frameworks and not args.flax_python:
        parser.error("the flax framework needs --flax-python PATH (transformers 5 has no Flax models)")

    passthrough = [f"--preset={args.preset}", f"--seconds={args.seconds}", f"--batch={args.batch}",
                   f"--dtype={args.dtype}", f"--remat={args.remat}", f"--steps={args.steps}",
                   f"--profile-top={args.profile_top}", f"--compile-profile={args.compile_profile}",
                   f"--attention={args.attention}",
                   *(["--unrolled"] if args.unrolled else []), *(["--post-ln"] if args.post_ln else []),
                   *(["--conv-remat"] if args.conv_remat else []),
                   *(["--no-norm-act-remat"] if args.no_norm_act_remat else []),
                   *(["--keep-compiler-memory"] if args.keep_compiler_memory else []),
                   *([f"--queue={args.queue}", f"--queue-size={args.queue_size}", f"--label={args.label}"]
                     if args.queue else [])]
    if args.queue and (args.frameworks != ["ours"] or args.rounds != 1 or not args.label):
        parser.error("--queue times one run of ours: --frameworks ours --rounds 1 --label NAME")
    runs: dict[str, list[dict]] = {name: [] for name in args.frameworks}
    failed: dict[str, str] = {}
    ours_env = _malloc_env(args.huge_pages != "none")
    peer_env = _malloc_env(args.huge_pages == "all")
    if args.compile_cache:
        shutil.rmtree(args.compile_cache, ignore_errors=True)
        ours_env |= {"JAX_COMPILATION_CACHE_DIR": args.compile_cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    if args.profile_top:  # inside a command buffer a kernel is traced under the buffer's name, not its op's
        ours_env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_enable_command_buffer=".strip()
    for r in range(args.rounds):
        for name in args.frameworks:
            if name in failed:
                continue
            try:
                if name == "flax":  # our config and batch code from this checkout, in the other Python
                    result = _run_worker(name, passthrough, {**peer_env, "PYTHONPATH": os.path.dirname(
                        os.path.dirname(os.path.abspath(__file__)))}, python=args.flax_python)
                else:
                    result = _run_worker(name, passthrough, ours_env if name == "ours" else peer_env)
            except RuntimeError as e:  # out of memory, say: the other framework's row still counts
                failed[name] = str(e)
                if args.queue and not os.path.exists(os.path.join(args.queue, f"ready.{args.label}")):
                    _queue_mark(args, "failed")  # the runs waiting for this one's compile go on
                print(e, file=sys.stderr, flush=True)
                continue
            runs[name].append(result)
            print(f"round {r + 1} {name}: median step {statistics.median(result['steps_s']):.2f} s, "
                  f"peak RSS {result['peak_rss_gib']:.2f} GiB", file=sys.stderr, flush=True)
    rows = {}
    for name, results in runs.items():
        if not results:
            continue
        steady = [t for res in results for t in res["steps_s"]]
        median = statistics.median(steady)
        device_peak = [res["device_peak_gib"] for res in results if res.get("device_peak_gib") is not None]
        peak_flops = results[0].get("peak_flops")
        rows[name] = {
            "device": results[0].get("device"), "num_params": results[0].get("num_params"),
            "step_s_median": median, "step_s_min": min(steady), "step_s_max": max(steady),
            "peak_rss_gib": statistics.median(res["peak_rss_gib"] for res in results),
            "device_peak_gib": statistics.median(device_peak) if device_peak else None,
            "flops_per_step": results[0].get("flops_per_step"),
            "mfu": results[0]["flops_per_step"] / median / peak_flops if peak_flops else None,
            "ready_s": statistics.median(res["ready_s"] for res in results),
            "compile_s": statistics.median(res["compile_s"] for res in results),
            "first_step_s": statistics.median(res["first_step_s"] for res in results),
            "rounds": [{k: v for k, v in res.items()} for res in results],
            "huge_pages": "hugetlb=1" in {**os.environ, **(ours_env if name == "ours" else peer_env)}.get(
                "GLIBC_TUNABLES", ""),
        }
    on_device = any(row["device_peak_gib"] is not None for row in rows.values())
    memory = "device peak GiB" if on_device else "peak RSS GiB"
    header = f"{'framework':<10} {'step s median':>13} {'min-max':>13} {memory:>15} {'MFU':>6} {'ready s':>8} " \
             f"{'compile s':>9} {'first step s':>12} {'start->1st step s':>17}"
    kernel = runs["ours"][0]["attention"] if runs.get("ours") else "-"
    print(f"{args.label + ': ' if args.label else ''}{args.preset}, {args.batch} x {args.seconds:g} s, {args.dtype}, remat {args.remat}"
          f"{' + conv_remat' if args.conv_remat else ''}"
          f"{', no norm_act_remat' if args.no_norm_act_remat else ''}"
          f"{', unrolled' if args.unrolled else ''}, our attention {kernel}, on "
          f"{', '.join(sorted({str(row['device']) for row in rows.values()}))}; malloc with huge pages: "
          f"{', '.join(name for name in rows if rows[name]['huge_pages']) or 'none'}")
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        to_first = row["ready_s"] + row["compile_s"] + row["first_step_s"]
        mem = row["device_peak_gib"] if on_device else row["peak_rss_gib"]
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        print(f"{name:<10} {row['step_s_median']:>13.3f} {row['step_s_min']:>6.3f}-{row['step_s_max']:<6.3f} "
              f"{mem:>15.2f} {mfu:>6} {row['ready_s']:>8.1f} {row['compile_s']:>9.1f} {row['first_step_s']:>12.1f} "
              f"{to_first:>17.1f}")
    for res in runs.get("ours", [])[:1]:
        if res.get("compiled_temp_gib") is not None:
            print(f"ours: the compiled step's temporaries {res['compiled_temp_gib']:.2f} GiB (XLA's memory analysis)")
    if args.compile_cache:
        for i, res in enumerate(runs.get("ours", [])):
            print(f"ours round {i + 1} ({'cold' if i == 0 else 'compilation cache warm'}): compile "
                  f"{res['compile_s']:.1f} s, first step {res['first_step_s']:.1f} s, process start to first step "
                  f"{res['ready_s'] + res['compile_s'] + res['first_step_s']:.1f} s")
    for i, res in enumerate(runs.get("ours", [])):
        if res.get("compile_phases"):
            print(f"\nours round {i + 1}, the compile: tracing + lowering {res['lower_s']:.2f} s, then the compiler's "
                  f"longest phases (seconds summed over threads; events; threads):")
            for name, t, n, threads in res["compile_phases"]["phases"]:
                print(f"  {name[:60]:<60} {t:>7.2f} s {n:>6} {threads:>3}")
            fusions = res["compile_phases"]["fusions_by_part"]
            print(f"the compiled program's {sum(fusions.values())} fusions by part: "
                  + ", ".join(f"{part} {n}" for part, n in fusions.items()))
    for res in runs.get("ours", [])[:1]:
        profile = res.get("profile")
        if profile:
            total = profile["kernel_s_per_step"]
            print(f"\nours, kernel time per step {total:.4f} s (of {rows['ours']['step_s_median']:.4f} s), by part:")
            for part, t in profile["by_part"].items():
                print(f"  {part:<40} {t:>9.4f} s {t / total:>6.1%}")
            print("slowest ops:")
            for op, t, name in profile["top_ops"]:
                print(f"  {op:<28} {t:>9.4f} s  {name[-100:]}")
    ratios = {}
    if "ours" in rows and "torch" in rows:
        key = "device_peak_gib" if on_device else "peak_rss_gib"
        ratios = {"step_time_ours_over_torch": rows["ours"]["step_s_median"] / rows["torch"]["step_s_median"],
                  f"{key}_ours_over_torch": rows["ours"][key] / rows["torch"][key]}
        print(f"ours / torch: step time {ratios['step_time_ours_over_torch']:.2f}x, "
              f"{memory} {ratios[f'{key}_ours_over_torch']:.2f}x")
    if "ours" in rows and "flax" in rows:
        key = "device_peak_gib" if on_device else "peak_rss_gib"
        ratios.update({"step_time_ours_over_flax": rows["ours"]["step_s_median"] / rows["flax"]["step_s_median"],
                       f"{key}_ours_over_flax": rows["ours"][key] / rows["flax"][key]})
        print(f"ours / flax: step time {ratios['step_time_ours_over_flax']:.2f}x, "
              f"{memory} {ratios[f'{key}_ours_over_flax']:.2f}x")
    print(json.dumps({"bench": "step", "config": {k: v for k, v in vars(args).items() if k != "worker"},
                      "cpus": os.cpu_count(), "results": rows, "ratios": ratios,
                      "failed": {name: err[-500:] for name, err in failed.items()}}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
