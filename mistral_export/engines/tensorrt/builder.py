"""TensorRT engines, built per GPU from a precision's ONNX and described by artifact.json (runners/tensorrt.py runs them).

TensorRT comes through `tensorrt_lib.require_tensorrt` and `polygraphy.backend.trt`, imported only inside the
functions that build, so the options and profile shapes here are plain Python that runs, and is tested, on
machines without TensorRT.

Building (TensorRT 11: strongly typed, the precision is whatever the ONNX says) goes through Polygraphy's loaders:
NetworkFromOnnxPath(strongly_typed=True) -> CreateConfig(profiles, load_timing_cache, builder_optimization_level,
the aliased-plugin-I/O preview feature) -> EngineFromNetwork(save_timing_cache) -> SaveEngine. The project's plugins
are registered first (mistral_export.plugins.tensorrt), so the parser binds the `mistral` nodes (plugin_namespace
"mistral", aot=1) to their ahead-of-time implementations instead of inlining the ONNX function bodies.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from mistral_export.artifacts.description import ArtifactDescription, CacheSpec, TensorRTSection
from mistral_export.artifacts.gpu import GpuDescription
from mistral_export.engines.graph_io import graph_io
from mistral_export.engines.tensorrt.inspection import engine_cache_copies
from mistral_export.errors import MistralExportError
from mistral_export.export.onnx_export import read_export_config
from mistral_export.files import file_sha256, tool_version
from mistral_export.model.config import ModelConfig
from mistral_export.op_contract import cache_input, cache_names
from mistral_export.plugins import aot
from mistral_export.tensorrt_lib import require_tensorrt, this_gpu

PLAN_FILE = "model.plan"
DEFAULT_TIMING_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mistral-export" / "tensorrt.timing-cache"
)


# ------------------------------------------------------------------------------------------------------------------
# Options and optimization profiles (plain Python)
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineOptions:
    """What a TensorRT engine is built for: batch and prefill-chunk ranges, builder effort, timing cache."""

    max_batch: int = 8
    opt_batch: int = 1
    max_chunk: int = 512  # the longest prefill chunk one step may run (longer prompts run in chunks)
    builder_optimization_level: int | None = None  # TensorRT's default (3) when None; 0..5
    timing_cache: Path | None = DEFAULT_TIMING_CACHE

    def check(self) -> None:
        if self.max_batch < 1:
            raise MistralExportError(f"--max-batch must be at least 1, got {self.max_batch}")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise MistralExportError(
                f"--opt-batch must be between 1 and --max-batch ({self.max_batch}), got {self.opt_batch}"
            )
        if self.max_chunk < 1:
            raise MistralExportError(f"--max-chunk must be at least 1, got {self.max_chunk}")
        level = self.builder_optimization_level
        if level is not None and not 0 <= level <= 5:
            raise MistralExportError(f"--builder-opt-level must be between 0 and 5, got {level}")

    def key(self) -> dict:
        """The options that change the engine (the timing cache only makes building faster)."""
        return {
            "max_batch": self.max_batch,
            "opt_batch": self.opt_batch,
            "max_chunk": self.max_chunk,
            "builder_optimization_level": self.builder_optimization_level,
        }


def profile_shapes(config: ModelConfig, options: EngineOptions) -> dict[str, dict[str, list[int]]]:
    """One optimization profile: input name -> {min, opt, max} shape.

    Batch runs 1..max_batch (optimized for opt_batch); the step length 1..max_chunk, optimized for 1 because decode
    steps are most of the steps of a generation; the caches are [B, Hkv, C, D] with C fixed at export.
    """
    options.check()
    cache = [config.num_kv_heads, config.cache_capacity, config.head_dim]
    lo, opt, hi = 1, options.opt_batch, options.max_batch
    shapes = {
        "input_ids": {"min": [lo, 1], "opt": [opt, 1], "max": [hi, options.max_chunk]},
        "past_len": {"min": [lo], "opt": [opt], "max": [hi]},
    }
    for past, _ in cache_names(config.num_layers):
        shapes[past] = {"min": [lo, *cache], "opt": [opt, *cache], "max": [hi, *cache]}
    return shapes


# ------------------------------------------------------------------------------------------------------------------
# What needs TensorRT
# ------------------------------------------------------------------------------------------------------------------


class _BuildMonitor:
    """TensorRT's IProgressMonitor feeding the build's progress display (phase name and steps)."""

    def __new__(cls, progress):
        trt = require_tensorrt("showing TensorRT's build progress")

        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)
                self.tasks = {}

            def phase_start(self, phase_name, parent_phase, num_steps):
                if parent_phase is None:  # nested phases would flood the display
                    self.tasks[phase_name] = progress.add_task(f"TensorRT: {phase_name}", total=num_steps)

            def step_complete(self, phase_name, step):
                if phase_name in self.tasks:
                    progress.update(self.tasks[phase_name], completed=step + 1)
                return True  # go on building

            def phase_finish(self, phase_name):
                task = self.tasks.pop(phase_name, None)
                if task is not None:
                    progress.remove_task(task)

        return Monitor()


def tensorrt_description(
    onnx_path: Path,
    gpu: GpuDescription,
    *,
    precision: str,
    options: EngineOptions,
    plugin_impl: str,
    build_seconds: float,
    ptx_isa: int | None = None,
    cache_copies: tuple[str, ...] | None = None,
) -> ArtifactDescription:
    """The artifact.json of an engine built from ONNX_PATH for GPU: model, cache and I/O read from that ONNX; the AOT
    kernels' PTX ISA (XY) and the cache copies TensorRT inserted, as the build found them."""
    config, metadata = read_export_config(onnx_path)
    io = graph_io(onnx_path)
    return ArtifactDescription(
        backend="tensorrt",
        precision=precision,
        config=config,
        cache=CacheSpec.of(config, io.input(cache_input(0, "key")).dtype),
        io=io,
        onnx_sha256=file_sha256(onnx_path),
        last_token_logits=metadata.get("mistral_export.last_token_logits") == "1",
        tool_version=tool_version(),
        build_seconds=build_seconds,
        tensorrt=TensorRTSection(
            file=PLAN_FILE,
            version=gpu.tensorrt_version,
            gpu=gpu.name,
            gpu_slug=gpu.slug,
            compute_capability=gpu.compute_capability,
            cuda_version=gpu.cuda_version,
            plugins=plugin_impl,
            profiles=(profile_shapes(config, options),),
            options=options.key(),
            ptx_isa=None if ptx_isa is None else f"{ptx_isa // 10}.{ptx_isa % 10}",
            cache_copies=cache_copies,
        ),
    )


def builder_config(
    profiles: list,
    *,
    timing_cache: str | None = None,
    builder_optimization_level: int | None = None,
    progress_monitor=None,
):
    """Polygraphy's CreateConfig for every engine of the project: the product's builds and the GPU tests' networks
    (tests/test_tensorrt_plugins.py), so a test never passes or fails for a configuration the product does not use.

    RollingCacheUpdate's output aliases its cache input (in place): TensorRT keeps that behind a preview feature.
    TF32 is off: an fp32 engine must compute in fp32 (validate's fp32 bar is 1e-4 on the logits); fp16 and int8
    engines are strongly typed in their own precision and never use it. Detailed profiling verbosity keeps each
    layer's inputs and outputs in the engine, which the build reads back (inspection.py) to see whether TensorRT
    inserted a copy of a cache tensor."""
    trt = require_tensorrt("configuring a TensorRT build")
    from polygraphy.backend.trt import CreateConfig

    return CreateConfig(
        profiles=profiles,
        tf32=False,
        load_timing_cache=timing_cache,
        builder_optimization_level=builder_optimization_level,
        preview_features=[trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03],
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
        progress_monitor=progress_monitor,
    )


def build_engine(
    onnx_path: Path, out_dir: Path, *, precision: str, options: EngineOptions, plugin_impl: str, progress=None
) -> tuple[Path, ArtifactDescription]:
    """Build ONNX_PATH into OUT_DIR/model.plan for this GPU; returns the plan's path and its engine description
    (written by the caller after the plan is in place)."""
    require_tensorrt("building a TensorRT engine")
    from polygraphy.backend.trt import EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    import mistral_export.plugins.tensorrt  # noqa: F401  (registers the mistral plugins the parser binds nodes to)

    config, _ = read_export_config(onnx_path)
    profile = Profile()
    for name, shape in profile_shapes(config, options).items():
        profile.add(name, min=shape["min"], opt=shape["opt"], max=shape["max"])
    timing_cache = str(options.timing_cache) if options.timing_cache else None
    if timing_cache:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
    create_config = builder_config(
        [profile],
        timing_cache=timing_cache if timing_cache and Path(timing_cache).exists() else None,
        builder_optimization_level=options.builder_optimization_level,
        progress_monitor=_BuildMonitor(progress) if progress is not None else None,
    )
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = out_dir / PLAN_FILE
    started = time.perf_counter()
    engine = SaveEngine(EngineFromNetwork(network, create_config, save_timing_cache=timing_cache), str(plan))()
    seconds = time.perf_counter() - started
    isa = aot.ptx_isa(aot.target_capability()) if plugin_impl == "aot" else None
    return plan, tensorrt_description(
        onnx_path,
        this_gpu(),
        precision=precision,
        options=options,
        plugin_impl=plugin_impl,
        build_seconds=seconds,
        ptx_isa=isa,
        cache_copies=engine_cache_copies(engine, config.num_layers),
    )
