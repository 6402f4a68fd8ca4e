"""`mistral-export validate`: every artifact of a build folder against the fp32 eager model, parity then latency.

    report = validate_build("build/tiny", quick=True)   # writes build/tiny/report/{report.json,report.md,*.png}
    report["passed"]

A user mistake (no build folder, no artifact, a checkpoint whose config differs from the artifact's) raises
MistralExportError; a parity failure is a report with passed = False.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from pathlib import Path

import torch

from mistral_export.artifacts.describe import folder_bytes
from mistral_export.artifacts.description import DESCRIPTION_FILE
from mistral_export.artifacts.folder import BUILD_FILE, Artifact, find_artifacts, onnx_dir, read_build
from mistral_export.errors import MistralExportError
from mistral_export.export.precision import check_precision
from mistral_export.model.checkpoint import load_model
from mistral_export.model.config import ModelConfig
from mistral_export.runners import open_runner
from mistral_export.runners.base import EagerRunner
from mistral_export.validate import cases, latency
from mistral_export.validate.console import Phases
from mistral_export.validate.report import environment, write_report
from mistral_export.validate.texts import load_texts
from mistral_export.validate.thresholds import THRESHOLDS

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(threads: int):
    """The eager model on the same number of threads as the artifact, for the run only."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def busy_machine_warning(machine: dict, threads: int) -> list[str]:
    """Other processes on the cores make timings noisy, and multi-threaded steps far slower (threads wait for each
    other's time slices): say so in the report rather than let a ratio mislead."""
    load = (machine.get("load_average") or [0.0])[0]
    cores = machine.get("cpu_count") or 1
    if load + threads <= cores + 0.5:
        return []
    return [
        f"the machine was busy (load average {load:.1f} on {cores} cores; threads: {threads}): latencies "
        f"and ratios are noisy{'; --threads 1 suffers least' if threads > 1 else ''}"
    ]


def eager_source(build_dir: Path, build: dict, model: str | None) -> str:
    source = model or build.get("model", {}).get("source")
    if not source:
        raise MistralExportError(
            f"{Path(build_dir) / BUILD_FILE}: built from an in-memory model (no checkpoint "
            f"recorded); pass --model CHECKPOINT for the eager reference"
        )
    return str(source)


def check_same_model(artifact: Artifact, config: ModelConfig, source: str) -> None:
    """The eager reference must be the artifact's model: same config, or every parity number is meaningless."""
    recorded = artifact.description.config.to_hf_dict()
    loaded = config.to_hf_dict()
    differing = sorted(k for k in set(recorded) | set(loaded) if recorded.get(k) != loaded.get(k))
    if differing:
        details = ", ".join(
            f"{k}: {recorded.get(k)!r} in the artifact, {loaded.get(k)!r} in the checkpoint" for k in differing
        )
        raise MistralExportError(
            f"checkpoint '{source}' is not the model of {artifact.folder / DESCRIPTION_FILE} "
            f"({details}); pass the checkpoint it was built from with --model"
        )


def runnable_here(artifact: Artifact) -> str | None:
    """None, or why this machine cannot run the artifact (a TensorRT engine without TensorRT)."""
    if artifact.backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed here (`pip install 'mistral-export[tensorrt]'` on a GPU machine)"
    return None


def cache_dtype_bytes(artifact: Artifact) -> int:
    return _DTYPE_BYTES.get(artifact.description.cache.dtype, 4)


def artifact_weight_bytes(artifact: Artifact) -> int:
    """Bytes of the files a runner loads its weights from (external data, or the TensorRT plan)."""
    if artifact.backend == "tensorrt":
        return folder_bytes(artifact.folder, [artifact.description.file])
    own = artifact.description.onnxruntime.own_data  # the INT8 artifacts' own weights; others share the ONNX's
    return folder_bytes(artifact.folder, [own or "model.onnx.data"])


def validate_artifact(
    artifact: Artifact,
    eager: EagerRunner,
    scripts: list[cases.Script],
    plan: latency.Plan,
    threads: int,
    phases: Phases,
    eager_memory: dict,
) -> dict:
    runner = open_runner(artifact, threads=threads)
    plan = latency.fit(plan, runner)
    results: list[cases.CaseResult] = []
    with phases.phase(f"parity  {artifact.label}", len(scripts)) as advance:
        for script in scripts:
            results += cases.run_script(script, runner, eager)
            advance()
    results.append(cases.pooled(results))
    case_reports = [r.report(artifact.precision) for r in results]
    if artifact.backend == "tensorrt":
        from mistral_export.validate.tensorrt_compare import compare_with_onnx

        compared = compare_with_onnx(artifact, runner, onnx_dir(artifact.folder.parents[2], artifact.precision))
        case_reports += [compared] if compared else []
    peak_reset = latency.reset_peak_rss()
    with phases.phase(f"latency {artifact.label}", 2 * len(plan.measurements) * plan.rounds) as advance:
        timings = latency.measure({"artifact": runner, "eager": eager}, plan, advance)
    config = eager.config
    per_sequence = config.kv_cache_bytes(config.cache_capacity, cache_dtype_bytes(artifact))
    memory = {
        "process_peak_rss_bytes": latency.peak_rss_bytes(),
        "peak_scope": "this artifact's latency phase" if peak_reset else "process lifetime",
        "artifact": {"weights_bytes": artifact_weight_bytes(artifact), "kv_cache_bytes_per_sequence": per_sequence},
        "eager": eager_memory,
    }
    memory["ratios"] = {k: memory["artifact"][k] / memory["eager"][k] for k in memory["eager"]}
    return artifact_report(
        artifact,
        cases=case_reports,
        memory=memory,
        latency={
            "artifact": timings["artifact"],
            "eager": timings["eager"],
            "ratios": latency.ratios(timings["artifact"], timings["eager"]),
        },
    )


def artifact_report(
    artifact: Artifact,
    *,
    skipped: str | None = None,
    cases: list[dict] = (),
    latency: dict | None = None,
    memory: dict | None = None,
) -> dict:
    """One artifact's entry in report.json: validated (its cases, latency, memory) or skipped, with why; for a
    TensorRT engine also what its build found (the AOT kernels' PTX ISA, the cache copies TensorRT inserted)."""
    section = artifact.description.tensorrt
    engine = (
        None
        if section is None
        else {
            "ptx_isa": section.ptx_isa,
            "cache_copies": None if section.cache_copies is None else list(section.cache_copies),
        }
    )
    return {
        "label": artifact.label,
        "backend": artifact.backend,
        "precision": artifact.precision,
        "folder": str(artifact.folder),
        "skipped": skipped,
        "passed": all(c["passed"] for c in cases),
        "thresholds": THRESHOLDS.get(artifact.precision, {}),
        "cases": list(cases),
        "latency": latency,
        "memory": memory,
        "tensorrt": engine,
    }


def cache_copy_warnings(artifacts: list[Artifact]) -> list[str]:
    """A warning per TensorRT engine in which TensorRT copies a cache tensor (every step then moves the cache), or
    whose build did not look."""
    warnings = []
    for artifact in artifacts:
        section = artifact.description.tensorrt
        if section is None:
            continue
        if section.cache_copies is None:
            warnings.append(f"{artifact.label}: its build did not record whether TensorRT copies the cache (rebuild)")
        elif section.cache_copies:
            warnings.append(
                f"{artifact.label}: TensorRT inserted {len(section.cache_copies)} cop"
                f"{'y' if len(section.cache_copies) == 1 else 'ies'} of cache tensors, so each step copies "
                f"the cache instead of updating it in place ({', '.join(section.cache_copies)})"
            )
    return warnings


def validate_build(
    build_dir: str | Path,
    model: str | None = None,
    precision: str | None = None,
    prompts: Path | None = None,
    report_dir: Path | None = None,
    quick: bool = False,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Validate every artifact of BUILD_DIR (or those of PRECISION); writes the report and returns it."""
    started = time.perf_counter()
    context = environment()  # the machine's load average as the run starts
    build_dir = Path(build_dir)
    if precision is not None:
        check_precision(precision)
    build = read_build(build_dir)
    artifacts = find_artifacts(build_dir, precision)
    source = eager_source(build_dir, build, model)
    threads = threads or default_threads()
    report_dir = Path(report_dir) if report_dir else build_dir / "report"
    with torch_threads(threads):
        eager = EagerRunner(load_model(source))  # fp32: the reference for every precision
        config = eager.config
        eager_memory = {
            "weights_bytes": sum(p.numel() * p.element_size() for p in eager.model.parameters()),
            "kv_cache_bytes_per_sequence": config.kv_cache_bytes(config.cache_capacity, 4),
        }
        for artifact in artifacts:
            check_same_model(artifact, config, source)
        texts = load_texts(build_dir, source, config, prompts, quick)
        scripts = cases.scripts(config, texts.prompts, texts.heldout, quick)
        plan = latency.validate_plan(config, quick)
        reports = []
        with Phases(progress) as phases:
            for artifact in artifacts:
                reason = runnable_here(artifact)
                reports.append(
                    artifact_report(artifact, skipped=reason)
                    if reason
                    else validate_artifact(artifact, eager, scripts, plan, threads, phases, eager_memory)
                )
    warnings = busy_machine_warning(context["machine"], threads) + cache_copy_warnings(artifacts)
    if all(r["skipped"] for r in reports):
        raise MistralExportError(f"{build_dir}: no artifact this machine can run ({reports[0]['skipped']})")
    report = {
        "format": 1,
        "kind": "validate",
        "passed": all(r["passed"] for r in reports),
        "build": {
            "dir": str(build_dir),
            "model_source": source,
            "model_name": config.name,
            "window": config.sliding_window,
            "cache_capacity": config.cache_capacity,
            "boundary_W": cases.boundary(config),
            "vocab_size": config.vocab_size,
        },
        "options": {
            "quick": quick,
            "precision": precision,
            "prompts": str(prompts) if prompts else None,
            "threads": threads,
            "tokens_from": texts.tokenizer,
        },
        **context,
        "warnings": warnings,
        "artifacts": reports,
        "seconds": None,
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_report(report, report_dir)
    return report
