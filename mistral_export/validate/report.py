"""The validate report: report.json (everything), report.md (the verdict first, readable in ten seconds), plots.

Ratios are artifact / eager: for times below 1 is faster, for tokens/s above 1 is faster.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mistral_export
from mistral_export.files import write_text_atomic
from mistral_export.pipeline.stages import tool_version

LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxscript", "numpy", "tensorrt", "polygraphy", "matplotlib")
MIB = 2**20


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def tool_identity() -> dict:
    """The package version, and the git commit when the package runs from a checkout."""
    root = Path(mistral_export.__file__).resolve().parent.parent
    commit = _git(root, "rev-parse", "HEAD") if (root / ".git").exists() else None
    dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no")) if commit else None
    return {"name": "mistral-export", "version": tool_version(), "git_commit": commit, "git_dirty": dirty}


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    gpu = None
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        gpu = sys.modules["torch"].cuda.get_device_name(0)
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory,
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def environment() -> dict:
    """When, with what, on what: the header of every report."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["mistral-export", *sys.argv[1:]]) if Path(sys.argv[0]).name == "mistral-export" else None,
        "tool": tool_identity(),
        "versions": {name: _installed(name) for name in LIBRARIES},
        "machine": machine(),
    }


def finite(document):
    """JSON has no NaN or Infinity: non-finite numbers become null (the report's nonfinite counts say why)."""
    if isinstance(document, float):
        return document if math.isfinite(document) else None
    if isinstance(document, dict):
        return {k: finite(v) for k, v in document.items()}
    if isinstance(document, list):
        return [finite(v) for v in document]
    return document


def write_report(report: dict, report_dir: Path) -> None:
    """Plots, report.md, then report.json last (its presence says the report is complete)."""
    from mistral_export.validate.plots import plot_validate

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = plot_validate(report, report_dir)
    write_text_atomic(report_dir / "report.md", markdown(report))
    # One line: the per-position arrays (thousands of positions per case) would take a line per number indented.
    write_text_atomic(
        report_dir / "report.json", json.dumps(finite(report), separators=(",", ":"), allow_nan=False) + "\n"
    )


# ------------------------------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------------------------------

_PERCENT = {"top1_agreement"}
_COUNT = {"greedy_match_tokens", "greedy_match_tokens_strict", "nonfinite_logits", "positions", "generated_tokens"}
_FIXED = {"perplexity_ratio": 4, "min_cosine": 6, "perplexity_eager": 2, "perplexity_artifact": 2}


def value_text(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NaN"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if metric in _PERCENT:
        return f"{100 * value:.1f}%"
    if metric in _COUNT:
        return str(int(value))
    if metric in _FIXED:
        return f"{value:.{_FIXED[metric]}f}"
    return f"{value:.1e}"


def bound_text(check: dict) -> str:
    symbol = {"<=": "≤ ", ">=": "≥ ", "==": "= "}.get(check["kind"], "")
    return f"{symbol}{value_text(check['metric'], check['bound'])}"


def cell(case: dict, metric: str) -> str:
    """The value, its bar in brackets when one applies, and a ✗ when it fails."""
    if metric not in case["metrics"]:
        return ""
    text = value_text(metric, case["metrics"][metric])
    check = next((c for c in case["checks"] if c["metric"] == metric), None)
    if check is not None and metric != "nonfinite_logits":
        text += f" ({bound_text(check)})"
    if check is not None and not check["passed"]:
        text += " ✗"
    return text


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def _ratio(artifact: dict, name: str, key: str) -> str:
    found = next((r for r in artifact["latency"]["ratios"] if r["name"] == name), None)
    return f"{found[key]:.2f}x" if found else ""


def headline_latency(artifact: dict) -> list[tuple[str, str, str]]:
    """(column title, measurement name, ratio key) of the ratios the summary shows."""
    timings = artifact["latency"]["artifact"]
    prefill = [t for t in timings if t["kind"] == "prefill" and t["batch"] == 1]
    decode = [t for t in timings if t["kind"] == "decode" and t["batch"] == 1]
    batched = [t for t in timings if t["kind"] == "decode" and t["batch"] > 1]
    at_w = next((t for t in decode if t["label"] == "W"), decode[-1])
    found = [
        ("decode at W (p50)", at_w["name"], "p50"),
        (f"decode at {decode[-1]['label']} (p50)", decode[-1]["name"], "p50"),
    ]
    found.append((f"TTFT {prefill[-1]['tokens']} tokens", prefill[-1]["name"], "p50"))
    if batched:
        found.append((f"tokens/s batch {batched[-1]['batch']}", batched[-1]["name"], "tokens_per_s"))
    return found


def _pooled(artifact: dict) -> dict | None:
    return next((c for c in artifact["cases"] if c["kind"] == "pooled"), None)


def _worst(artifact: dict, metric: str, larger_is_worse: bool) -> dict | None:
    """The case with the worst value of METRIC (NaN is the worst of all)."""

    def badness(case: dict) -> float:
        value = case["metrics"][metric]
        if value is None or math.isnan(value):
            return math.inf
        return value if larger_is_worse else -value

    cases = [c for c in artifact["cases"] if metric in c["metrics"] and c["kind"] != "pooled"]
    return max(cases, key=badness) if cases else None


def summary_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The ten-second table: one row per artifact (console and report.md)."""
    header = [
        "artifact",
        "parity",
        "max |Δlogit|",
        "top-1 (prompts + held-out)",
        "greedy match",
        "perplexity ratio",
        "NaN/Inf",
    ]
    latency_columns: list[str] = []
    rows = []
    for artifact in report["artifacts"]:
        if artifact["skipped"]:
            rows.append([artifact["label"], f"skipped: {artifact['skipped']}"])
            continue
        cases = artifact["cases"]
        row = [artifact["label"], f"{_verdict(artifact['passed'])} {sum(c['passed'] for c in cases)}/{len(cases)}"]
        worst_abs = _worst(artifact, "max_abs_logit_diff", True)
        row.append(cell(worst_abs, "max_abs_logit_diff") if worst_abs else "")
        pooled = _pooled(artifact)
        row.append(cell(pooled, "top1_agreement") if pooled else "")
        greedy = _worst(artifact, "greedy_match_tokens", False)
        row.append(_greedy_cell(greedy, cases) if greedy else "")
        heldout = next((c for c in cases if c["kind"] == "heldout"), None)
        row.append(cell(heldout, "perplexity_ratio") if heldout else "")
        row.append(str(sum(c["metrics"]["nonfinite_logits"] for c in cases if c["kind"] != "pooled")))
        columns = headline_latency(artifact)
        latency_columns = latency_columns or [f"{title} vs eager" for title, _, _ in columns]
        row += [_ratio(artifact, name, key) for _, name, key in columns]
        rows.append(row)
    width = len(header) + len(latency_columns)
    return header + latency_columns, [r + [""] * (width - len(r)) for r in rows]


def _greedy_cell(worst: dict, cases: list[dict]) -> str:
    """'64 (≥ 32) of 64', and the fewest strict matches where a tie resolved the other way counted as one."""
    metrics = worst["metrics"]
    text = f"{cell(worst, 'greedy_match_tokens')} of {metrics['generated_tokens']}"
    strict = min(
        c["metrics"].get("greedy_match_tokens_strict", c["metrics"]["greedy_match_tokens"])
        for c in cases
        if c["kind"] == "greedy"
    )
    return text if strict >= metrics["greedy_match_tokens"] else f"{text} (strict: {strict}, a tie)"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    escape = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]


CASE_COLUMNS = [
    ("positions", "positions"),
    ("max |Δlogit|", "max_abs_logit_diff"),
    ("rel. error", "rel_logit_error"),
    ("min cosine", "min_cosine"),
    ("top-1", "top1_agreement"),
    ("KL mean", "kl_mean"),
    ("KL max", "kl_max"),
    ("greedy match", "greedy_match_tokens"),
    ("strict", "greedy_match_tokens_strict"),
    ("perplexity ratio", "perplexity_ratio"),
    ("NaN/Inf", "nonfinite_logits"),
]


def _failures(report: dict) -> list[str]:
    lines = []
    for artifact in report["artifacts"]:
        for case in artifact["cases"]:
            for check in case["checks"]:
                if not check["passed"]:
                    what = (
                        str(check["value"])
                        if check["metric"] == "error"
                        else f"{check['metric']} {value_text(check['metric'], check['value'])}, bar {bound_text(check)}"
                    )
                    lines.append(f"- **{artifact['label']}** · {case['name']}: {what}")
    return lines


def markdown(report: dict) -> str:
    build = report["build"]
    ran = [a for a in report["artifacts"] if not a["skipped"]]
    lines = [f"# mistral-export validate: {_verdict(report['passed'])}", ""]
    window = f"W={build['window']}" if build["window"] else f"no window, capacity {build['cache_capacity']}"
    lines.append(
        f"{len(ran)} artifact(s) of `{build['dir']}` against the fp32 eager model ({build['model_name']}, "
        f"{window}){', --quick' if report['options']['quick'] else ''}. A value's bar (validate/thresholds.py; a case's top-1 "
        "bar less its sampling noise) follows it in brackets; latency columns are artifact / eager (time: < 1 is faster; tokens/s: > 1 "
        "is faster)."
    )
    lines.append("")
    header, rows = summary_rows(report)
    lines += _table(header, rows)
    lines += [""] + [f"Warning: {w}." for w in report["warnings"]] if report["warnings"] else []
    failures = _failures(report)
    if failures:
        lines += ["", "Failing cases:", ""] + failures
    for plot in report.get("plots", []):
        lines += ["", f"![{plot['title']}]({plot['file']})"]
    for artifact in ran:
        lines += ["", f"## {artifact['label']}", "", "Parity (against the fp32 eager model):", ""]
        lines += _table(
            ["case"] + [title for title, _ in CASE_COLUMNS] + ["result"],
            [
                [c["name"]]
                + [cell(c, metric) for _, metric in CASE_COLUMNS]
                + [_verdict(c["passed"]) + (f": {c['error']}" if c["error"] else "")]
                for c in artifact["cases"]
            ],
        )
        lines += ["", "Latency (p50 / p90 / p99 ms; tokens/s from p50):", ""]
        rows = []
        for a, e, r in zip(
            artifact["latency"]["artifact"], artifact["latency"]["eager"], artifact["latency"]["ratios"]
        ):
            rows.append(
                [
                    a["name"],
                    f"{a['p50_ms']:.2f} / {a['p90_ms']:.2f} / {a['p99_ms']:.2f}",
                    f"{e['p50_ms']:.2f} / {e['p90_ms']:.2f} / {e['p99_ms']:.2f}",
                    f"{r['p50']:.2f}x",
                    f"{a['tokens_per_s']:.0f} / {e['tokens_per_s']:.0f}",
                    f"{r['tokens_per_s']:.2f}x",
                ]
            )
        lines += _table(
            ["measurement", "artifact", "eager", "time ratio", "tokens/s artifact / eager", "tokens/s ratio"], rows
        )
        memory = artifact["memory"]
        lines += [
            "",
            f"Memory: weights {memory['artifact']['weights_bytes'] / MIB:.1f} MiB (eager "
            f"{memory['eager']['weights_bytes'] / MIB:.1f} MiB); KV cache per sequence "
            f"{memory['artifact']['kv_cache_bytes_per_sequence'] / MIB:.2f} MiB (eager "
            f"{memory['eager']['kv_cache_bytes_per_sequence'] / MIB:.2f} MiB); process peak RSS "
            f"{memory['process_peak_rss_bytes'] / MIB:.0f} MiB ({memory['peak_scope']}, both models resident).",
        ]
    for artifact in report["artifacts"]:
        if artifact["skipped"]:
            lines += ["", f"## {artifact['label']}: skipped ({artifact['skipped']})"]
    lines += ["", "## Run", ""] + environment_lines(report)
    return "\n".join(lines) + "\n"


def environment_lines(report: dict) -> list[str]:
    m, tool = report["machine"], report["tool"]
    commit = (
        tool["git_commit"][:12] + (" (with uncommitted changes)" if tool["git_dirty"] else "")
        if tool["git_commit"]
        else "not a checkout"
    )
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
    load = " ".join(f"{x:.2f}" for x in m["load_average"]) if m["load_average"] else "?"
    return [
        f"- machine: {m['cpu']}, {m['cpu_count']} cores, {(m['memory_bytes'] or 0) / 2**30:.0f} GiB"
        f"{', ' + m['gpu'] if m['gpu'] else ''}; load average at start {load}; threads: {report['options']['threads']}",
        f"- tool: mistral-export {tool['version']}, commit {commit}",
        f"- versions: {versions}",
        f"- command: `{report['command'] or 'validate_build(...)'}`; created {report['created']}; "
        f"{report['seconds']} s; tokens from {report['options']['tokens_from']}",
    ]
