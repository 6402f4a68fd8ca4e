"""What `build` shows while it works: one line per stage (built or skipped, and how long), a spinner or a bar while a
stage runs (rich, on stderr), the pipeline's log messages as the running stage's description.

On a stderr that is not a terminal (a CI log, a pipe) rich shows no spinner, so a stage's start and each log message
are printed as lines instead: a log says what a long stage is doing, and a script can tell which stage runs."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn


class BuildProgress:
    """Stage lines and progress bars on stderr; `quiet=True` shows nothing (library use, tests)."""

    def __init__(self, quiet: bool = False, console: Console | None = None):
        self.console = console or Console(stderr=True, quiet=quiet)
        self.bars = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._stage_task = None

    def __enter__(self) -> BuildProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.stop()

    def note(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def line(self, message: str) -> None:
        """MESSAGE as a line of its own where no live display shows it (stderr is not a terminal)."""
        if not self.console.is_terminal:
            self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def skipped(self, stage: str, why: str = "inputs unchanged") -> None:
        self.console.print(f"[dim]- {stage}: {why}, skipped[/dim]", highlight=False)

    @contextmanager
    def stage(self, stage: str, what: str):
        """A running stage: a spinner with its description (updated by the pipeline's log messages)."""
        task = self.bars.add_task(f"{stage}: {what}", total=None)
        self.line(f"… {stage}: {what}")
        previous, self._stage_task = self._stage_task, task
        handler = _DescriptionHandler(self, task, stage)
        logger = logging.getLogger("mistral_export")
        logger.addHandler(handler)
        level = logger.level
        logger.setLevel(logging.INFO)
        started = time.perf_counter()
        try:
            yield task
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            self.bars.remove_task(task)
            self._stage_task = previous
        self.console.print(f"[green]✓[/green] {stage}: {what} ({time.perf_counter() - started:.1f} s)", highlight=False)

    @contextmanager
    def bar(self, description: str, total: float):
        """A bar inside the running stage (bytes hashed, TensorRT phases...); yields `advance(amount)`."""
        task = self.bars.add_task(description, total=total)
        try:
            yield lambda amount: self.bars.advance(task, amount)
        finally:
            self.bars.remove_task(task)


class _DescriptionHandler(logging.Handler):
    def __init__(self, progress: BuildProgress, task, stage: str):
        super().__init__(logging.INFO)
        self.progress, self.task, self.stage = progress, task, stage

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.bars.update(self.task, description=f"{self.stage}: {record.getMessage()}")
        self.progress.line(f"  {self.stage}: {record.getMessage()}")
