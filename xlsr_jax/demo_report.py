"""The demo's `report.html`: one self-contained page (inline SVG charts, no plotting library)."""

from __future__ import annotations

import html
import math
import pathlib
from collections.abc import Sequence

WIDTH, HEIGHT, PAD = 440, 220, 40
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def line_chart(title: str, series: dict[str, Sequence[tuple[float, float]]], xlabel: str = "step") -> str:
    """An SVG line chart of (x, y) series; non-finite points are dropped. Empty string when there is no point."""
    series = {k: [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)] for k, pts in series.items()}
    points = [p for pts in series.values() for p in pts]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x):
        return PAD + (x - x0) / (x1 - x0) * (WIDTH - 1.5 * PAD)

    def sy(y):
        return HEIGHT - PAD + (y0 - y) / (y1 - y0) * (HEIGHT - 1.6 * PAD)

    parts = [f'<svg width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg" font-size="11">',
             f'<text x="{WIDTH / 2}" y="14" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD / 2}" y2="{HEIGHT - PAD}" stroke="#888"/>',
             f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{PAD}" y2="{0.6 * PAD}" stroke="#888"/>',
             f'<text x="{WIDTH / 2}" y="{HEIGHT - 6}" text-anchor="middle">{html.escape(xlabel)}</text>']
    for t in _ticks(y0, y1):
        parts.append(f'<text x="{PAD - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in _ticks(x0, x1):
        parts.append(f'<text x="{sx(t):.1f}" y="{HEIGHT - PAD + 14}" text-anchor="middle">{_fmt(t)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        if len(pts) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        for x, y in pts if len(pts) <= 3 else ():
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>')
        parts.append(f'<text x="{WIDTH - PAD / 2}" y="{26 + 12 * i}" text-anchor="end" fill="{color}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(title: str, values: dict[str, float], limit: float | None = None) -> str:
    """Horizontal bars, one per key (e.g. CER per language)."""
    if not values:
        return ""
    top = limit or max(max(values.values()), 1e-9)
    row = 16
    height = 30 + row * len(values)
    parts = [f'<svg width="{WIDTH}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="11">',
             f'<text x="{WIDTH / 2}" y="14" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>']
    for i, (name, value) in enumerate(values.items()):
        y = 24 + i * row
        w = max(0.0, min(value / top, 1.0)) * (WIDTH - 140)
        parts.append(f'<text x="56" y="{y + 11}" text-anchor="end">{html.escape(name)}</text>')
        parts.append(f'<rect x="60" y="{y}" width="{w:.1f}" height="{row - 3}" fill="{COLORS[0]}"/>')
        parts.append(f'<text x="{64 + w:.1f}" y="{y + 11}">{_fmt(value)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def confusion_table(labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> str:
    """Rows: true label; columns: predicted. Cells shaded by their share of the row."""
    if not labels or not matrix:
        return ""
    head = "".join(f"<th>{html.escape(lab)}</th>" for lab in labels)
    rows = []
    for lab, counts in zip(labels, matrix):
        total = max(sum(counts), 1)
        cells = []
        for j, c in enumerate(counts):
            alpha = c / total
            color = "46,160,67" if lab == labels[j] else "214,39,40"
            cells.append(f'<td style="background: rgba({color},{alpha:.2f})">{c or ""}</td>')
        rows.append(f"<tr><th>{html.escape(lab)}</th>{''.join(cells)}</tr>")
    return (f'<table class="confusion"><tr><th>true \\ predicted</th>{head}</tr>{"".join(rows)}</table>')


def _series(rows: list[dict], key: str, split: str = "train") -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in rows if r.get("split") == split and isinstance(r.get(key), (int, float))]


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


CSS = """body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}
.charts{display:flex;flex-wrap:wrap;gap:8px}.skipped{color:#a60}code{background:#f4f4f4}
table.confusion td{text-align:center;min-width:2em}"""


def write_report(result, path: str | pathlib.Path) -> pathlib.Path:
    """Write the demo's report (a `xlsr_jax.demo.DemoResult`) as one HTML file; returns its path."""
    path = pathlib.Path(path)
    curves = result.curves
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>xlsr-jax demo</title><style>{CSS}</style>"
           "</head><body><h1>xlsr-jax demo</h1>",
           f"<p>Work directory <code>{html.escape(str(result.workdir))}</code>; budget {result.plan.minutes:g} min "
           f"({result.plan.pretrain_steps} pretraining, {result.plan.ctc_steps} CTC, {result.plan.lid_steps} "
           f"language-ID steps); total wall time {result.seconds:.0f} s.</p>", "<h2>Stages</h2>"]
    out.append(_table([(s.name, f"{s.seconds:.1f} s", headline(s)) for s in result.stages],
                      ("stage", "wall time", "result")))

    pre = curves.get("pretrain", [])
    out.append("<h2>Pretraining</h2><div class='charts'>")
    out.append(line_chart("loss", {"train": _series(pre, "loss"), "dev": _series(pre, "loss", "eval")}))
    out.append(line_chart("contrastive accuracy", {"train": _series(pre, "accuracy"),
                                                   "dev": _series(pre, "accuracy", "eval")}))
    out.append(line_chart("codebook perplexity", {"code": _series(pre, "code_perplexity"),
                                                  "prob": _series(pre, "prob_perplexity")}))
    out.append(line_chart("audio seconds per second", {"train": _series(pre, "audio_seconds_per_second")}))
    out.append("</div>")
    stage = result.stage("pretrain")
    if stage.summary.get("preempted_at"):
        out.append(f"<p>SIGTERM at step {stage.summary['preempted_at']}: the loop saved that step and stopped; the "
                   f"same call resumed from it (parameters, optimizer and data-iterator position restored) and "
                   f"ran to step {stage.summary['steps']}.</p>")

    fit = result.stage("fit")
    out.append("<h2>On a TPU slice (<code>xlsr-jax fit</code>)</h2>")
    if fit.skipped:
        out.append(f"<p class='skipped'>Skipped: {html.escape(fit.skipped)}</p>")
    else:
        out.append("<pre>" + html.escape("\n".join(fit.summary.get("lines", []))) + "</pre>")
        out.append(f"<p>For a real preset: <code>{html.escape(fit.summary.get('command', ''))}</code></p>")

    ctc = result.stage("finetune_ctc")
    out.append("<h2>CTC fine-tuning (ASR)</h2><div class='charts'>")
    out.append(line_chart("CTC loss per token", {"train": _series(curves.get("finetune_ctc", []), "loss")}))
    per_lang = {lang: m["cer"] for lang, m in ctc.summary.get("per_language", {}).items() if "cer" in m}
    out.append(bar_chart("dev CER per language", per_lang, limit=max([1.0, *per_lang.values()])))
    out.append("</div>")
    metrics = ctc.summary.get("metrics", {})
    out.append(_table([(k, _fmt(v)) for k, v in metrics.items()], ("dev metric", "value")))
    if ctc.summary.get("examples"):
        out.append(_table([tuple(e) for e in ctc.summary["examples"]], ("reference", "hypothesis")[: len(
            ctc.summary["examples"][0])]))

    lid = result.stage("finetune_lid")
    out.append("<h2>Language ID</h2><div class='charts'>")
    out.append(line_chart("cross-entropy", {"train": _series(curves.get("finetune_lid", []), "loss")}))
    acc = {lang: m["accuracy"] for lang, m in lid.summary.get("per_language", {}).items() if "accuracy" in m}
    out.append(bar_chart("dev accuracy per language", acc, limit=1.0))
    out.append("</div>")
    out.append(_table([(k, _fmt(v)) for k, v in lid.summary.get("metrics", {}).items()], ("dev metric", "value")))
    out.append(confusion_table(lid.summary.get("confusion_labels", []), lid.summary.get("confusion") or []))

    hf = result.stage("export_hf")
    out.append("<h2>Hugging Face export</h2>")
    if hf.skipped:
        out.append(f"<p class='skipped'>{html.escape(hf.skipped)}</p>")
    if hf.summary:
        out.append(_table([(k, v) for k, v in hf.summary.items()], ("check", "value")))

    out.append("<h2>Artifacts</h2>")
    out.append(_table([(name, where) for s in result.stages for name, where in s.artifacts.items()],
                      ("what", "where")))
    out.append("</body></html>")
    path.write_text("\n".join(part for part in out if part))
    return path


def _headline(stage) -> str:
    """One line per stage for the stages table (also what the CLI prints)."""
    s = stage.summary
    if stage.name == "prepare":
        return s.get("line", "")
    if stage.name == "pretrain":
        loss = s.get("loss") or [math.nan, math.nan]
        line = (f"{s.get('steps')} steps on {s.get('devices')} device(s): loss {loss[0]:.3f} -> {loss[1]:.3f}, "
                f"contrastive accuracy {s.get('accuracy') or math.nan:.3f}, code perplexity "
                f"{s.get('code_perplexity') or math.nan:.1f}")
        if s.get("preempted_at"):
            line += f"; SIGTERM at step {s['preempted_at']}, resumed from it"
        return line
    if stage.name == "fit":
        if "peak_gib" not in s:
            return ""
        return (f"{s['target']}: peak {s['peak_gib']} GiB of {s['hbm_gib']} GiB per chip, "
                f"{'fits' if s['fits'] else 'does NOT fit'}")
    if stage.name in ("finetune_ctc", "finetune_lid"):
        m = s.get("metrics", {})
        loss = s.get("loss") or [math.nan, math.nan]
        shown = ", ".join(f"{k} {m[k]:.3f}" for k in ("cer", "wer", "blank_ratio", "accuracy") if k in m)
        return f"{s.get('steps')} steps: train loss {loss[0]:.3f} -> {loss[1]:.3f}; dev {shown}"
    if stage.name == "export_hf":
        parts = [f"{k} {v:.2e}" for k, v in s.items() if k.endswith("max_abs_diff")]
        return ("transformers agrees: " if s.get("agree") else "transformers DISAGREES: ") + ", ".join(parts)
    return ""


def headline(stage) -> str:
    """The stage's one-line result, or why it was skipped."""
    text = _headline(stage)
    if stage.skipped and not stage.summary:
        return f"skipped: {stage.skipped}"
    return text
