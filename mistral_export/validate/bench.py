"""`mistral-export bench`: validate's latency part alone, over a grid of batch x context x prompt length.

Every artifact of the build folder this machine can run, and the eager model when its checkpoint is known, are
measured in one process, interleaved (validate/latency.py). Writes bench.json and bench.png.
"""

from __future__ import annotations

import time
from pathlib import Path

from mistral_export.artifacts.folder import find_artifacts, read_build
from mistral_export.errors import MistralExportError
from mistral_export.files import write_json_atomic
from mistral_export.model.checkpoint import load_model
from mistral_export.runners import open_runner
from mistral_export.runners.base import EagerRunner
from mistral_export.validate import latency
from mistral_export.validate.cases import boundary
from mistral_export.validate.console import Phases
from mistral_export.validate.plots import bench_plot
from mistral_export.validate.report import environment, finite
from mistral_export.validate.suite import (
    busy_machine_warning,
    check_same_model,
    default_threads,
    eager_source,
    runnable_here,
    torch_threads,
)

EAGER = "eager (torch, fp32)"


def bench_build(
    build_dir: str | Path,
    batches: list[int] = (1, 4, 16),
    prompt_lengths: list[int] | None = None,
    samples: int = 20,
    model: str | None = None,
    report_dir: Path | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    started = time.perf_counter()
    context = environment()
    build_dir = Path(build_dir)
    build = read_build(build_dir)
    artifacts = find_artifacts(build_dir)
    threads = threads or default_threads()
    report_dir = Path(report_dir) if report_dir else build_dir / "report"
    runnable = [a for a in artifacts if runnable_here(a) is None]
    if not runnable:
        raise MistralExportError(f"{build_dir}: no artifact this machine can run ({runnable_here(artifacts[0])})")
    config = runnable[0].description.config
    lengths = prompt_lengths or [boundary(config) // 4, boundary(config), 4 * boundary(config)]
    plan = latency.grid_plan(config, list(batches), lengths, samples)
    with torch_threads(threads):
        runners = {a.label: open_runner(a, threads=threads) for a in runnable}
        eager_note = None
        if model or build.get("model", {}).get("source"):
            source = eager_source(build_dir, build, model)
            eager = EagerRunner(load_model(source))
            for artifact in runnable:
                check_same_model(artifact, eager.config, source)
            runners[EAGER] = eager
        else:
            eager_note = "no eager baseline: the build was made from an in-memory model (pass --model CHECKPOINT)"
        with Phases(progress) as phases:
            with phases.phase("bench", len(runners) * len(plan.measurements) * plan.rounds) as advance:
                timings = latency.measure(runners, plan, advance)
    report = {
        "format": 1,
        "kind": "bench",
        "build": {
            "dir": str(build_dir),
            "model_name": config.name,
            "window": config.sliding_window,
            "cache_capacity": config.cache_capacity,
        },
        "grid": {
            "batches": list(batches),
            "prompt_lengths": lengths,
            "contexts": dict(latency.decode_contexts(config)),
            "samples": samples,
            "threads": threads,
        },
        **context,
        "runners": [{"label": label, "timings": found} for label, found in timings.items()],
        "skipped": [{"label": a.label, "reason": runnable_here(a)} for a in artifacts if runnable_here(a)],
        "note": eager_note,
        "warnings": busy_machine_warning(context["machine"], threads),
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    report["plot"] = bench_plot(report, report_dir / "bench.png")
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(report_dir / "bench.json", finite(report))
    return report
