"""Step metrics: a JSONL log, TensorBoard event files (`events.EventWriter`), a progress line,
and model FLOPs utilization from an analytic FLOP count (attention included)."""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from collections.abc import Mapping

import jax
from etils import epath

from xlsr_jax.config import Wav2Vec2Config
from xlsr_jax.train.events import EventWriter

log = logging.getLogger(__name__)

# Peak dense bf16 FLOP/s per chip (vendor figures). CPU has no meaningful peak: MFU is not reported.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
}


def device_peak_flops(device=None) -> float | None:
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_FLOPS.items():
        if kind.startswith(name):
            return peak
    return None


def train_flops_per_step(config: Wav2Vec2Config, num_params: int, batch_size: int, num_samples: int) -> float:
    """Model FLOPs (forward + backward) of one step on a padded [batch_size, num_samples] batch.

    Per sequence of T frames: 6 * (parameters outside the conv encoder) * T for the matmuls (the
    positional conv included: each of its weights is used once per frame), 12 * layers * T^2 * hidden
    for attention (Q K^T and P V, 2 * 2 * T^2 * hidden forward, x3 with the backward pass), and
    3 x the conv encoder's forward over the samples. Padding counts: it is computed.
    """
    frames = config.num_frames(num_samples)
    conv_params = 0
    conv_fwd = 0.0
    length = num_samples
    in_dim = 1
    for dim, k, s in zip(config.conv_dim, config.conv_kernel, config.conv_stride):
        length = (length - k) // s + 1
        conv_fwd += 2.0 * length * k * in_dim * dim
        conv_params += k * in_dim * dim
        in_dim = dim
    dense = 6.0 * (num_params - conv_params) * frames
    attention = 12.0 * config.num_hidden_layers * frames * frames * config.hidden_size
    return float(batch_size) * (dense + attention + 3.0 * conv_fwd)


class MetricsWriter:
    """Writes every logged step to `workdir/metrics.jsonl` and TensorBoard; prints a progress line."""

    def __init__(self, workdir: str | pathlib.Path, total_steps: int, enabled: bool = True):
        """`workdir`: local, or a bucket path (gs://...), where metrics.jsonl and the TensorBoard event file
        are rewritten at each write (object stores cannot append)."""
        self.enabled = enabled
        self.total_steps = total_steps
        self._tb = None
        self._file = None
        self._remote_lines: list[str] | None = None
        self._start_time = time.time()
        self._start_step: int | None = None
        if not enabled:
            return
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._path = workdir / "metrics.jsonl"
        if "://" in str(workdir):
            self._remote_lines = self._path.read_text().splitlines(keepends=True) if self._path.exists() else []
        else:
            self._file = open(self._path, "a", buffering=1)
        self._tb = EventWriter(workdir / "tensorboard")

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "split": prefix, "time": round(time.time(), 3)}
        row.update({k: _py(v) for k, v in metrics.items()})
        if self._remote_lines is not None:
            self._remote_lines.append(json.dumps(row) + "\n")
            self._path.write_text("".join(self._remote_lines))
        else:
            self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            self._tb.write(step, {f"{prefix}/{key}": value for key, value in row.items()
                                  if key not in ("step", "split", "time") and isinstance(value, (int, float))
                                  and math.isfinite(value)}, wall_time=row["time"])

    def progress(self, step: int, metrics: Mapping[str, float]) -> str:
        """A one-line progress report with rate and ETA (also logged)."""
        if self._start_step is None:
            self._start_step, self._start_time = step, time.time()
            rate = float("nan")
        else:
            rate = (step - self._start_step) / max(time.time() - self._start_time, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")  # nan > 0 is False
        parts = [f"step {step}/{self.total_steps}", f"loss {metrics.get('loss', float('nan')):.4f}"]
        for key in ("code_perplexity", "accuracy", "learning_rate", "audio_seconds_per_second", "mfu"):
            if key in metrics:
                parts.append(f"{key} {metrics[key]:.4g}")
        parts.append("warming up" if math.isnan(rate) else f"{rate:.2f} steps/s")
        if not math.isnan(eta):
            parts.append(f"ETA {_duration(eta)}")
        line = " | ".join(parts)
        if self.enabled:
            print(line, flush=True)
        return line

    def eval_line(self, step: int, metrics: Mapping[str, float]) -> str:
        """A one-line evaluation summary: the headline metrics, then CER or accuracy per language."""
        head = [k for k in ("loss", "wer", "cer", "blank_ratio", "accuracy", "code_perplexity") if k in metrics]
        per_language = sorted(k for k in metrics if k.startswith(("cer/", "accuracy/")))
        parts = [f"eval step {step}"] + [f"{k} {metrics[k]:.4g}" for k in head]
        if per_language:
            parts.append(" ".join(f"{k} {metrics[k]:.3g}" for k in per_language))
        line = " | ".join(parts)
        if self.enabled:
            print(line, flush=True)
        return line

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _py(value):
    try:
        value = value.item()
    except AttributeError:
        pass
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
