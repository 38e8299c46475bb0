"""`xlsr-jax fit`: will this config fit that pod? Compile the real train step for it from a CPU machine.

The step compiled here is `build_program(...).train_step`, the object `train_and_evaluate` runs,
lowered from abstract state (`jax.eval_shape`: nothing is allocated) for the abstract devices of a
TPU topology (or N fake CPU devices). The report gives XLA's per-chip memory against the chip's HBM,
the collectives the step runs, the analytic FLOPs and the step time they imply at a given MFU, an
analytic memory estimate beside the compiled figure, and optionally the largest batch that fits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import re
import time

import jax
import ml_collections
import numpy as np

from data_pipelines.batching import budget_batch_sizes
from xlsr_jax.config import ConfigError, Wav2Vec2Config
from xlsr_jax.models.encoder import attention_kernel
from xlsr_jax.parallel.hlo import CollectiveStats, collective_stats, count_sharding_annotations
from xlsr_jax.parallel.mesh import build_mesh, check_mesh_covers, resolve_mesh_config
from xlsr_jax.parallel.topology import Topology, topology_devices
from xlsr_jax.train.loop import pipeline_config
from xlsr_jax.train.metrics import device_peak_flops, train_flops_per_step
from xlsr_jax.train.program import TrainProgram, abstract_batch, build_program
from xlsr_jax.tasks import make_task

log = logging.getLogger(__name__)

# What XLA's TPU compiler says when a program does not fit, e.g.
# "Ran out of memory in memory space hbm. Used 52.01G of 15.75G hbm. Exceeded hbm capacity by 36.26G." or
# "the total memory required for HLO temporaries (37.61G) exceeds available HBM (15.75G)" (temporaries alone).
_OOM = re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"
                  r"|HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass
class MemoryEstimate:
    """Analytic per-chip bytes: the train state over its shards, gradients, saved activations."""

    state: int  # params + Adam moments (float32), per the state shardings
    gradients: int  # float32, sharded like the params
    activations: int  # what the remat policy keeps for the backward pass, plus the conv encoder

    @property
    def total(self) -> int:
        return self.state + self.gradients + self.activations


@dataclasses.dataclass
class FitReport:
    target: str
    num_devices: int
    mesh: dict[str, int]
    global_batch: int
    num_samples: int
    accum_steps: int
    hbm_bytes: int | None
    fits: bool
    attention: str = ""  # the train step's attention kernel on the target ("xla", "cudnn", "splash")
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    peak_bytes: int = 0  # arguments + outputs - donated aliases + temporaries
    annotations: int = 0
    collectives: CollectiveStats | None = None
    flops_per_step: float = 0.0
    peak_flops_per_chip: float | None = None
    estimate: MemoryEstimate | None = None
    remedies: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (override, analytic bytes saved)
    lower_seconds: float = 0.0
    compile_seconds: float = 0.0
    error: str = ""  # the compiler's out-of-memory message, when it refused

    @property
    def margin_bytes(self) -> int | None:
        return None if self.hbm_bytes is None else self.hbm_bytes - self.peak_bytes

    def step_seconds(self, mfu: float) -> float | None:
        """Step time implied by the analytic FLOPs at model-FLOPs utilization `mfu`."""
        if not self.peak_flops_per_chip:
            return None
        return self.flops_per_step / (self.peak_flops_per_chip * self.num_devices * mfu)

    def summary(self) -> dict:
        """Flat numbers for a JSON line."""
        gib = 2**30
        out = {
            "target": self.target, "devices": self.num_devices, "mesh": self.mesh, "global_batch": self.global_batch,
            "num_samples": self.num_samples, "accum_steps": self.accum_steps, "fits": self.fits,
            "attention": self.attention,
            "peak_gib": round(self.peak_bytes / gib, 3), "argument_gib": round(self.argument_bytes / gib, 3),
            "temp_gib": round(self.temp_bytes / gib, 3), "output_gib": round(self.output_bytes / gib, 3),
            "hbm_gib": None if self.hbm_bytes is None else round(self.hbm_bytes / gib, 2),
            "annotations": self.annotations, "tflops_per_step": round(self.flops_per_step / 1e12, 3),
            "lower_s": round(self.lower_seconds, 1), "compile_s": round(self.compile_seconds, 1),
        }  # fmt: skip
        if not self.fits and self.remedies:
            out["remedies_gib"] = {flag: round(b / gib, 3) for flag, b in self.remedies}
        if self.estimate is not None:
            out["estimate_gib"] = round(self.estimate.total / gib, 3)
            out["compiled_over_estimate"] = round(self.peak_bytes / max(self.estimate.total, 1), 3)
        if self.collectives is not None:
            out["collectives"] = {op: n for op, n, _ in self.collectives.rows()}
            out["collective_gib"] = {op: round(b / gib, 3) for op, _, b in self.collectives.rows()}
        for mfu in (0.4, 0.6):
            t = self.step_seconds(mfu)
            if t is not None:
                out[f"step_s_at_{int(mfu * 100)}pct_mfu"] = float(f"{t:.4g}")
        return out


def fit_program(config: ml_collections.ConfigDict, devices: list) -> TrainProgram:
    """The train program of `config` on `devices` (abstract TPU devices or CPU devices); no data is read."""
    from xlsr_jax.train.loop import model_config_from

    model_config = model_config_from(config)
    mesh_config = resolve_mesh_config(config.mesh_preset, config.mesh)
    mesh = build_mesh(mesh_config, devices)
    task = make_task(config, model_config, None, None)  # no data: stand-in vocabulary / label count
    return build_program(config, mesh, task)


def analytic_memory(program: TrainProgram, global_batch: int, num_samples: int,
                    model_config: Wav2Vec2Config | None = None, accum_steps: int | None = None) -> MemoryEstimate:
    """Per-chip bytes from first principles (no compiler): state and gradients over their shards + activations.

    `model_config` / `accum_steps` replace the program's in the activation count (what-if estimates: parameter
    shapes must not change). Accumulating over micro-batches adds a float32 gradient accumulator.

    Activations per sequence of T frames and per layer, under the remat policy: `full` keeps the
    layer input (T*H); `dots` keeps every matmul output (q, k, v, attention output, out_proj, FFN in
    and out: 6*T*H + T*F in the compute dtype, and the float32 attention scores heads*T*T);
    `dots_no_batch` keeps the weight matmuls only (5*T*H + T*F); `none` keeps the softmax's output in
    place of the scores and, without `norm_act_remat`, the GELU's two float32 intermediates (2*T*F) and the
    two LayerNorms' (4*T*H). A fused attention kernel (splash on a TPU, cuDNN on a GPU) keeps no scores: at
    most its output and float32 softmax statistics (heads*T). Each conv encoder layer keeps its conv output
    and its GELU's input and output in the compute dtype ([T_i, 512] each; without `norm_act_remat`, the
    LayerNorm's float32 intermediates in place of the GELU's output); with `conv_remat`, only its input and
    conv output.
    Sequences are split over data*fsdp, heads and FFN width over tensor.
    """
    cfg: Wav2Vec2Config = model_config or program.model_config
    accum = accum_steps or program.accum_steps
    mesh = program.mesh

    def shard_bytes(abstract, shardings) -> int:
        leaves = zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings))
        return int(sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a, s in leaves))

    state = shard_bytes(program.abstract_state, program.state_shardings)
    gradients = shard_bytes(program.abstract_state.params, program.state_shardings.params)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    tensor = mesh.shape["tensor"]
    rows = global_batch / batch_shards / accum  # sequences per chip per micro-batch
    t = cfg.num_frames(num_samples)
    h, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    b = np.dtype(cfg.dtype).itemsize
    platform = program.mesh.devices.flat[0].platform
    fused = attention_kernel(cfg, deterministic=False, platform=platform) != "xla"
    scores = (n / tensor) * t * (4 if fused else t * 4)
    dots = (2 * h + 4 * h / tensor + f / tensor) * t * b + scores
    per_layer = {
        "full": t * h * b,
        "dots": dots,
        "dots_no_batch": (2 * h + (4 if fused else 3) * h / tensor + f / tensor) * t * b + (scores if fused else 0),
        "none": dots + (0 if cfg.norm_act_remat else (2 * f / tensor + 4 * h) * t * 4),
    }[cfg.remat_policy]
    kept_per_conv_frame = 2 * b if cfg.conv_remat else (3 * b if cfg.norm_act_remat else 2 * b + 4)
    conv = 0.0
    length = num_samples
    for dim, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride):
        length = (length - k) // s + 1
        conv += length * dim * kept_per_conv_frame
    activations = rows * (cfg.num_hidden_layers * per_layer + conv + 4 * t * h * 4)
    return MemoryEstimate(state=state, gradients=gradients * (2 if accum > 1 else 1), activations=int(activations))


def memory_remedies(program: TrainProgram, global_batch: int, num_samples: int,
                    max_tokens: int = 0) -> list[tuple[str, int]]:
    """Overrides that lower the per-chip peak without changing the update, each with its analytic saving in
    bytes, largest first: rematerializing more (layers, conv encoder) and twice the micro-batches (with an
    audio budget, `max_tokens` samples per batch shard and micro-batch, each micro-batch gets half of it)."""
    cfg = program.model_config
    base = analytic_memory(program, global_batch, num_samples).total
    options = []
    if cfg.remat_policy != "full":
        options.append(("--config.model.overrides.remat_policy=full", dataclasses.replace(cfg, remat_policy="full"),
                        program.accum_steps))
    if not cfg.conv_remat:
        options.append(("--config.model.overrides.conv_remat=True", dataclasses.replace(cfg, conv_remat=True),
                        program.accum_steps))
    accum = 2 * program.accum_steps
    splits = global_batch % (accum * program.mesh.shape["data"] * program.mesh.shape["fsdp"]) == 0
    if splits and (not max_tokens or max_tokens // 2 >= num_samples):  # a budget holds at least one crop
        flag = f"--config.train.accum_steps={accum}"
        options.append((f"{flag} --config.data.max_tokens={max_tokens // 2}" if max_tokens else flag, cfg, accum))
    saved = [(flag, base - analytic_memory(program, global_batch, num_samples, c, a).total) for flag, c, a in options]
    return sorted([(flag, b) for flag, b in saved if b > 0], key=lambda r: -r[1])


def _oom_bytes(message: str) -> tuple[int, int] | None:
    """(bytes needed, bytes available) from the compiler's out-of-memory message, or None."""
    m = _OOM.search(message)
    if not m:
        return None
    used, unit, limit, limit_unit = [g for g in m.groups() if g is not None]
    return int(float(used) * _UNITS[unit]), int(float(limit) * _UNITS[limit_unit])


def compile_once(program: TrainProgram, global_batch: int, num_samples: int, hbm_bytes: int | None,
                 target: str, with_details: bool = True, dump_dir: str | None = None) -> FitReport:
    """Lower and compile `program.train_step` at [global_batch, num_samples]; never allocates.

    `dump_dir` receives `lowered.txt` (StableHLO) and `compiled.txt` (the optimized HLO) for inspection.
    """
    mesh = {k: int(v) for k, v in program.mesh.shape.items()}
    report = FitReport(target=target, num_devices=program.mesh.size, mesh=mesh, global_batch=global_batch,
                       num_samples=num_samples, accum_steps=program.accum_steps, hbm_bytes=hbm_bytes, fits=False)
    report.flops_per_step = train_flops_per_step(program.model_config, program.num_params, global_batch, num_samples)
    report.peak_flops_per_chip = device_peak_flops(program.mesh.devices.flat[0])
    report.estimate = analytic_memory(program, global_batch, num_samples)
    report.attention = attention_kernel(program.model_config, deterministic=False,
                                        platform=program.mesh.devices.flat[0].platform)
    t0 = time.perf_counter()
    lowered = program.train_step.lower(program.abstract_state_with_shardings(),
                                       abstract_batch(program, global_batch, num_samples))
    report.lower_seconds = time.perf_counter() - t0
    if with_details:
        report.annotations = count_sharding_annotations(lowered.as_text())
    if dump_dir:
        pathlib.Path(dump_dir).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(dump_dir) / "lowered.txt").write_text(lowered.as_text())
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED when the program exceeds HBM
        report.compile_seconds = time.perf_counter() - t0
        used = _oom_bytes(str(e))
        if used is None:
            raise
        report.peak_bytes, limit = used
        report.hbm_bytes = min(hbm_bytes or limit, limit)
        report.error = _OOM.search(str(e)).group(0)
        return report
    report.compile_seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    report.argument_bytes = int(ma.argument_size_in_bytes)
    report.output_bytes = int(ma.output_size_in_bytes)
    report.alias_bytes = int(ma.alias_size_in_bytes)
    report.temp_bytes = int(ma.temp_size_in_bytes)
    report.peak_bytes = report.argument_bytes + report.output_bytes - report.alias_bytes + report.temp_bytes
    report.fits = hbm_bytes is None or report.peak_bytes <= hbm_bytes
    if with_details:
        report.collectives = collective_stats(compiled.as_text())
    if dump_dir:
        (pathlib.Path(dump_dir) / "compiled.txt").write_text(compiled.as_text())
    return report


def largest_fitting(program: TrainProgram, report: FitReport, search: str, max_probes: int = 6,
                    progress=None) -> tuple[int, int]:
    """(largest global batch or crop that fits, compiles spent): a memory-linear guess, then bisection.

    Batches move in multiples of accum_steps * data * fsdp, crops in multiples of the conv stride (320).
    """
    if report.hbm_bytes is None:
        raise ConfigError("the largest fitting batch needs a TPU topology (CPU devices have no HBM limit)")
    unit = program.accum_steps * program.mesh.shape["data"] * program.mesh.shape["fsdp"] if search == "batch" else 320
    start = (report.global_batch if search == "batch" else report.num_samples) // unit

    def fits(k: int) -> bool:
        batch, samples = (k * unit, report.num_samples) if search == "batch" else (report.global_batch, k * unit)
        r = compile_once(program, batch, samples, report.hbm_bytes, report.target, with_details=False)
        if progress:
            progress(f"  {search} {k * unit}: {'fits' if r.fits else 'does not fit'} "
                     f"({r.peak_bytes / 2**30:.2f} GiB, {r.compile_seconds:.0f} s)")
        return r.fits

    fixed = report.argument_bytes + report.output_bytes - report.alias_bytes if report.fits else 0
    if report.fits:
        lo, hi = start, None
        # Temporaries grow about linearly with the batch (and a little faster with the crop).
        per_unit = max(report.temp_bytes / start, 1)
        guess = max(start + 1, int((report.hbm_bytes - fixed) / per_unit))
    else:
        lo, hi = 0, start
        guess = max(1, int(start * report.hbm_bytes / max(report.peak_bytes, 1)))
    probes = 0
    while probes < max_probes and (hi is None or hi - lo > 1):
        k = guess if probes == 0 else (lo * 2 if hi is None else (lo + hi) // 2)
        k = max(k, lo + 1) if hi is None else min(max(k, lo + 1), hi - 1)
        probes += 1
        if fits(k):
            lo = k
        else:
            hi = k
    return lo * unit, probes


def fit(config: ml_collections.ConfigDict, topology: Topology | None = None, devices: list | None = None,
        num_samples: int | None = None, dump_dir: str | None = None) -> tuple[TrainProgram, FitReport]:
    """Compile `config`'s train step for `topology` (or for `devices`) and report memory, collectives, FLOPs."""
    if topology is not None:
        check_mesh_covers(config.mesh_preset, config.mesh, topology.chips_per_slice, topology.num_slices,
                          topology.name)
        devices = topology_devices(topology)
        target, hbm = topology.describe(), topology.hbm_bytes
    else:
        devices = list(devices if devices is not None else jax.devices())
        target, hbm = f"{len(devices)} {devices[0].platform.upper()} devices", None
    program = fit_program(config, devices)
    samples = int(num_samples or config.data.max_sample_size)
    batch = config.data.global_batch_size
    budget = pipeline_config(config, 1, mesh=program.mesh)
    if budget.samples_per_batch:  # data.max_tokens: the rows the budget gives a batch of this length
        batch = int(budget_batch_sizes(np.asarray([samples]), budget.samples_per_batch, budget.batch_multiple)[0])
    report = compile_once(program, batch, samples, hbm, target, dump_dir=dump_dir)
    report.remedies = memory_remedies(program, batch, samples, max_tokens=config.data.get("max_tokens", 0))
    return program, report


def format_report(report: FitReport) -> list[str]:
    """Human-readable lines of a fit report (the CLI prints them)."""
    gib = 2**30
    lines = [f"target: {report.target}; mesh {report.mesh}; global batch {report.global_batch} x "
             f"{report.num_samples / 16000:.1f} s ({report.num_samples} samples), accum_steps {report.accum_steps}, "
             f"attention kernel {report.attention}"]
    if report.error:
        lines.append(f"compiler: {report.error}")
    else:
        lines.append(f"per-chip memory: arguments {report.argument_bytes / gib:.2f} GiB, temporaries "
                     f"{report.temp_bytes / gib:.2f} GiB, outputs {report.output_bytes / gib:.2f} GiB "
                     f"(donated {report.alias_bytes / gib:.2f}), peak {report.peak_bytes / gib:.2f} GiB")
    if report.estimate is not None:
        e = report.estimate
        lines.append(f"analytic estimate: state {e.state / gib:.2f} + gradients {e.gradients / gib:.2f} + "
                     f"activations {e.activations / gib:.2f} = {e.total / gib:.2f} GiB "
                     f"(compiled / estimate = {report.peak_bytes / max(e.total, 1):.2f})")
    if report.hbm_bytes is not None:
        margin = report.margin_bytes / gib
        verdict = "FITS" if report.fits else "DOES NOT FIT"
        lines.append(f"{verdict}: peak {report.peak_bytes / gib:.2f} GiB of {report.hbm_bytes / gib:.2f} GiB HBM "
                     f"({'margin' if margin >= 0 else 'over by'} {abs(margin):.2f} GiB)")
        if not report.fits and report.remedies:
            lines.append("  less memory per chip, the same update (analytic savings; rerun fit with them): "
                         + ", ".join(f"{flag} (-{b / gib:.2f} GiB)" for flag, b in report.remedies))
    if report.collectives is not None:
        rows = report.collectives.rows()
        text = ", ".join(f"{n} {op} ({b / gib:.3f} GiB)" for op, n, b in rows) or "none"
        lines.append(f"collectives per step: {text}")
        lines.append(f"sharding annotations in the lowered step: {report.annotations}")
    lines.append(f"model FLOPs per step: {report.flops_per_step / 1e12:.1f} TFLOP (attention included)")
    for mfu in (0.4, 0.6):
        t = report.step_seconds(mfu)
        if t is not None:
            lines.append(f"  step time at {int(mfu * 100)}% MFU: {t:.3f} s")
    lines.append(f"lower {report.lower_seconds:.1f} s, compile {report.compile_seconds:.1f} s")
    return lines
