"""What validate and bench show on the terminal: a progress bar per phase (stderr), then the summary table."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mistral_export.validate.report import summary_rows


class Phases:
    """One bar per phase on stderr; `enabled=False` shows nothing (library use)."""

    def __init__(self, enabled: bool = True):
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True, quiet=not enabled),
        )

    def __enter__(self) -> Phases:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    @contextmanager
    def phase(self, description: str, total: int):
        """A bar for one phase; yields `advance()`."""
        task = self.progress.add_task(description, total=total)
        yield lambda: self.progress.advance(task)
        self.progress.update(task, completed=total)


def print_summary(report: dict, report_dir, console: Console | None = None) -> None:
    console = console or Console()
    header, rows = summary_rows(report)
    # One column per artifact: a handful of artifacts fit an 80-column terminal, a dozen metrics would not.
    table = Table(
        "", *(row[0] for row in rows), title=f"mistral-export validate: {'PASS' if report['passed'] else 'FAIL'}"
    )
    for i, title in enumerate(header[1:], start=1):
        table.add_row(title, *(row[i] for row in rows))
    console.print(table)
    for artifact in report["artifacts"]:
        for case in artifact["cases"]:
            if not case["passed"]:
                failed = "; ".join(_failed_check(c) for c in case["checks"] if not c["passed"])
                console.print(f"[red]FAIL[/red] {artifact['label']} · {case['name']}: {failed}", highlight=False)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning[/yellow]: {warning}", highlight=False)
    console.print(f"report: {report_dir}/report.md (report.json, plots)", highlight=False)


def _failed_check(check: dict) -> str:
    if check["metric"] == "error":
        return str(check["value"])
    return f"{check['metric']} {check['value']} (bar {check['kind']} {check['bound']})"


def print_bench(report: dict, report_dir, console: Console | None = None) -> None:
    console = console or Console()
    table = Table("runner", "measurement", "p50 ms", "p90 ms", "p99 ms", "tokens/s", title="mistral-export bench")
    for runner in report["runners"]:
        for t in runner["timings"]:
            table.add_row(
                runner["label"],
                t["name"],
                f"{t['p50_ms']:.2f}",
                f"{t['p90_ms']:.2f}",
                f"{t['p99_ms']:.2f}",
                f"{t['tokens_per_s']:.0f}",
            )
    console.print(table)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning[/yellow]: {warning}", highlight=False)
    for skipped in report["skipped"]:
        console.print(f"skipped {skipped['label']}: {skipped['reason']}", highlight=False)
    console.print(f"bench: {report_dir}/bench.json, {report_dir}/bench.png", highlight=False)
