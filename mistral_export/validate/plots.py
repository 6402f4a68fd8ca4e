"""PNG plots of validate and bench reports (matplotlib, Agg backend: no display needed).

Each figure has a fixed size in pixels (figure inches x DPI, no tight bounding box), which the report records.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from mistral_export.files import written_atomically

DPI = 100
DECODE_SIZE = (9.0, 4.5)  # inches: 900 x 450 px
BOUNDARY_SIZE = (9.0, 6.0)  # 900 x 600 px
BENCH_SIZE = (12.0, 4.5)  # 1200 x 450 px


def _save(figure, path: Path, title: str) -> dict:
    with written_atomically(path) as tmp:
        figure.savefig(tmp, dpi=DPI, format="png")
    plt.close(figure)
    width, height = figure.get_size_inches() * DPI
    return {"file": path.name, "title": title, "width": round(width), "height": round(height)}


def _mark_window(axis, window: int | None, upto: float, every: bool = True) -> None:
    """Dotted lines at W, 2W, 3W ... (or at W alone)."""
    if not window:
        return
    for k in range(1, 1 + int(upto // window) if every else 2):
        axis.axvline(k * window, color="0.6", linestyle=":", linewidth=1)
        axis.text(
            k * window,
            1.0,
            f" {k}W" if k > 1 else " W",
            transform=axis.get_xaxis_transform(),
            va="top",
            fontsize=8,
            color="0.4",
        )


def _log_axes(axis) -> None:
    """Log scales with plain numbers on the time axis (2, 3, 20 ms, not 2×10^0)."""
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.yaxis.set_minor_formatter(
        matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else "")
    )


def _context_ticks(axis, timings: list[dict]) -> None:
    ticks = {t["tokens"]: f"{t['label']}\n{t['tokens']}" if t["label"] else str(t["tokens"]) for t in timings}
    axis.set_xticks(list(ticks), list(ticks.values()))
    axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def decode_latency_plot(report: dict, path: Path) -> dict:
    title = "decode step latency vs context (batch 1; p50, bar to p90)"
    figure, axis = plt.subplots(figsize=DECODE_SIZE, constrained_layout=True)
    ran = [a for a in report["artifacts"] if a["latency"]]
    series = [(a["label"], a["latency"]["artifact"]) for a in ran] + [
        ("eager (torch, fp32)", ran[0]["latency"]["eager"])
    ]
    for label, timings in series:
        decode = [t for t in timings if t["kind"] == "decode" and t["batch"] == 1]
        x = [t["tokens"] for t in decode]
        p50 = [t["p50_ms"] for t in decode]
        up = [t["p90_ms"] - t["p50_ms"] for t in decode]
        axis.errorbar(
            x,
            p50,
            yerr=[[0] * len(up), up],
            marker="o",
            capsize=3,
            linestyle="--" if label.startswith("eager") else "-",
            label=label,
        )
    _log_axes(axis)
    _context_ticks(axis, [t for t in series[0][1] if t["kind"] == "decode" and t["batch"] == 1])
    axis.set_xlabel("context (tokens already in the sequence)")
    axis.set_ylabel("ms per decode step")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    axis.grid(True, which="both", alpha=0.3)
    return _save(figure, path, title)


def _rolling_mean(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def boundary_plot(report: dict, path: Path) -> dict:
    """Per-position |Δlogit| and top-1 agreement along the chunked prefill with the smallest chunk (every chunk after
    the first reads the rolling cache) and the single decode steps around W and 3W."""
    title = "artifact vs eager, position by position across the window"
    figure, (top, bottom) = plt.subplots(2, 1, figsize=BOUNDARY_SIZE, sharex=True, constrained_layout=True)
    last = 1
    bars = set()
    for artifact in (a for a in report["artifacts"] if a["cases"]):
        chunked = [c for c in artifact["cases"] if c["kind"] == "chunked"]
        if not chunked:
            continue
        case = min(chunked, key=lambda c: c["detail"]["chunk"])
        rows = case["per_position"]
        diffs = [d if d is not None and not math.isnan(d) else math.nan for d in rows["max_abs_diff"]]
        (line,) = top.plot(
            rows["position"], [max(d, 1e-12) for d in diffs], linewidth=1, label=f"{artifact['label']}: {case['name']}"
        )
        agree = [1.0 if a else 0.0 for a in rows["top1_agree"]]
        bottom.plot(
            rows["position"],
            _rolling_mean(agree, 8),
            color=line.get_color(),
            linewidth=1,
            label=f"{artifact['label']} (mean of 8 positions)",
        )
        decode = [c for c in artifact["cases"] if c["kind"] == "decode"]
        xs = [c["per_position"]["position"][0] for c in decode if c["per_position"]["position"]]
        ys = [
            max(c["per_position"]["max_abs_diff"][0] or math.nan, 1e-12)
            for c in decode
            if c["per_position"]["position"]
        ]
        top.scatter(xs, ys, color=line.get_color(), marker="D", s=18, zorder=3)
        nan_positions = [p for p, d in zip(rows["position"], diffs) if math.isnan(d)]
        if nan_positions:
            top.scatter(
                nan_positions,
                [1.0] * len(nan_positions),
                transform=top.get_xaxis_transform(),
                marker="x",
                color="red",
                label=f"{artifact['label']}: NaN/Inf",
            )
        last = max([last, *rows["position"], *xs])
        bars.update(
            (k, v, artifact["precision"])
            for k, v in artifact["thresholds"].items()
            if k in ("max_abs_logit_diff", "top1_agreement")
        )
    for metric, bound, precision in sorted(bars):
        (top if metric == "max_abs_logit_diff" else bottom).axhline(
            bound, color="red", linestyle="--", linewidth=0.8, label=f"{precision} bar ({bound:g})"
        )
    top.set_yscale("log")
    top.set_ylabel("max |Δlogit| at the position")
    top.set_title(f"{title}\nlines: chunked prefill; diamonds: single decode steps; dashed red: the bars", fontsize=10)
    bottom.set_ylabel("top-1 agreement")
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_xlabel("position")
    for axis in (top, bottom):
        _mark_window(axis, report["build"]["boundary_W"], last)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    return _save(figure, path, title)


def plot_validate(report: dict, report_dir: Path) -> list[dict]:
    if not any(a["latency"] for a in report["artifacts"]):
        return []
    return [
        decode_latency_plot(report, Path(report_dir) / "decode_latency.png"),
        boundary_plot(report, Path(report_dir) / "window_boundary.png"),
    ]


def bench_plot(report: dict, path: Path) -> dict:
    """Decode step vs context and prefill vs prompt length, one line per runner and batch."""
    title = "bench: decode step vs context, prefill vs prompt length (p50)"
    figure, (left, right) = plt.subplots(1, 2, figsize=BENCH_SIZE, constrained_layout=True)
    for runner in report["runners"]:
        for batch in sorted({t["batch"] for t in runner["timings"]}):
            style = "--" if runner["label"].startswith("eager") else "-"
            for axis, kind in ((left, "decode"), (right, "prefill")):
                points = [t for t in runner["timings"] if t["kind"] == kind and t["batch"] == batch]
                axis.plot(
                    [t["tokens"] for t in points],
                    [t["p50_ms"] for t in points],
                    style,
                    marker="o",
                    label=f"{runner['label']}, batch {batch}",
                )
    left.set_xlabel("context (tokens)")
    left.set_ylabel("ms per decode step")
    right.set_xlabel("prompt tokens")
    right.set_ylabel("ms per prefill")
    for axis in (left, right):
        _log_axes(axis)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    _mark_window(left, report["build"]["window"], 0, every=False)
    for axis, kind in ((left, "decode"), (right, "prefill")):
        first_batch = report["runners"][0]["timings"][0]["batch"]
        _context_ticks(
            axis, [t for t in report["runners"][0]["timings"] if t["kind"] == kind and t["batch"] == first_batch]
        )
    figure.suptitle(title, fontsize=10)
    return _save(figure, path, title)
