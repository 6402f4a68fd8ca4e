"""TensorRT engines: built per GPU from a precision's ONNX, described by engine.json, loaded with a compatibility check,
and run by `TensorRTRunner`.

The one engines module that needs TensorRT; it imports `tensorrt` and `polygraphy.backend.trt` only inside the
functions that use them, so everything else here (profile shapes from the options, the GPU slug, the engine.json
document, the compatibility check) is plain Python that runs, and is tested, on machines without TensorRT.

Building (TensorRT 11: strongly typed, the precision is whatever the ONNX says) goes through Polygraphy's loaders:
NetworkFromOnnxPath(strongly_typed=True) -> CreateConfig(profiles, load_timing_cache, builder_optimization_level,
the aliased-plugin-I/O preview feature) -> EngineFromNetwork(save_timing_cache) -> SaveEngine. The project's plugins
are registered first (mistral_export.plugins.tensorrt), so the parser binds the `mistral` nodes (plugin_namespace
"mistral", aot=1) to their ahead-of-time implementations instead of inlining the ONNX function bodies.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mistral_export.engines.runner import Runner
from mistral_export.errors import MistralExportError
from mistral_export.model.config import ModelConfig

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'mistral-export[tensorrt]'"
PLAN_FILE = "model.plan"
DEFAULT_TIMING_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mistral-export" / "tensorrt.timing-cache"


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
            raise MistralExportError(f"--opt-batch must be between 1 and --max-batch ({self.max_batch}), got {self.opt_batch}")
        if self.max_chunk < 1:
            raise MistralExportError(f"--max-chunk must be at least 1, got {self.max_chunk}")
        level = self.builder_optimization_level
        if level is not None and not 0 <= level <= 5:
            raise MistralExportError(f"--builder-opt-level must be between 0 and 5, got {level}")

    def key(self) -> dict:
        """The options that change the engine (the timing cache only makes building faster)."""
        return {"max_batch": self.max_batch, "opt_batch": self.opt_batch, "max_chunk": self.max_chunk,
                "builder_optimization_level": self.builder_optimization_level}


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
    for i in range(config.num_layers):
        for kind in ("key", "value"):
            shapes[f"past_key_values.{i}.{kind}"] = {"min": [lo, *cache], "opt": [opt, *cache], "max": [hi, *cache]}
    return shapes


# ------------------------------------------------------------------------------------------------------------------
# The GPU an engine is for, and the compatibility check (plain Python)
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuDescription:
    """The facts that decide whether an engine runs here: TensorRT plans are tied to the compute capability and the
    exact TensorRT version they were built with."""

    name: str
    compute_capability: str  # "9.0"
    tensorrt_version: str
    cuda_version: str | None = None

    @property
    def slug(self) -> str:
        return gpu_slug(self.name)

    @property
    def folder_name(self) -> str:
        from mistral_export.engines.artifacts import tensorrt_folder_name

        return tensorrt_folder_name(self.slug, self.compute_capability)


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA GeForce RTX 4090' -> 'geforce-rtx-4090'."""
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return re.sub(r"^nvidia-", "", words) or "gpu"


def engine_gpu(engine: dict) -> GpuDescription:
    section = engine["tensorrt"]
    return GpuDescription(section["gpu"], section["compute_capability"], section["version"], section.get("cuda_version"))


def check_compatible(engine: dict, here: GpuDescription, where: Path | str) -> list[str]:
    """Refuse an engine built for another compute capability or TensorRT version, naming both; returns warnings
    (another GPU model of the same compute capability runs the engine, with tactics timed on the other one)."""
    built = engine_gpu(engine)
    rebuild = "rebuild it here with `mistral-export build MODEL -o DIR --backend tensorrt`"
    if built.compute_capability != here.compute_capability:
        raise MistralExportError(
            f"{where}: engine built for {built.name} (sm {built.compute_capability}); this machine has {here.name} "
            f"(sm {here.compute_capability}): TensorRT engines run only on the compute capability they were built for; {rebuild}")
    if built.tensorrt_version != here.tensorrt_version:
        raise MistralExportError(
            f"{where}: engine built with TensorRT {built.tensorrt_version}; this machine has TensorRT "
            f"{here.tensorrt_version}: a plan runs only under the TensorRT version that built it; {rebuild}")
    if built.name != here.name:
        return [f"{where}: engine built on {built.name}, running on {here.name} (same sm {here.compute_capability}): "
                "it runs, but its tactics were timed on the other GPU"]
    return []


def engine_document(*, precision: str, config: ModelConfig, cache: dict, onnx_sha256: str, gpu: GpuDescription,
                    options: EngineOptions, plugin_impl: str, tool_version: str, build_seconds: float) -> dict:
    """engine.json of a TensorRT engine (the same document as the ONNX Runtime artifact's, with a `tensorrt` section)."""
    from mistral_export.engines.artifacts import ENGINE_FORMAT

    return {
        "format": ENGINE_FORMAT,
        "backend": "tensorrt",
        "precision": precision,
        "tool_version": tool_version,
        "model": {"name": config.name, "config": config.to_hf_dict()},
        "cache": cache,
        "onnx_sha256": onnx_sha256,
        "tensorrt": {
            "file": PLAN_FILE,
            "version": gpu.tensorrt_version,
            "gpu": gpu.name,
            "gpu_slug": gpu.slug,
            "compute_capability": gpu.compute_capability,
            "cuda_version": gpu.cuda_version,
            "strongly_typed": True,
            "plugins": plugin_impl,
            "profiles": [profile_shapes(config, options)],
            "options": {k: v for k, v in asdict(options).items() if k != "timing_cache"},
        },
        "build_seconds": round(build_seconds, 2),
    }


# ------------------------------------------------------------------------------------------------------------------
# What needs TensorRT
# ------------------------------------------------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why a TensorRT engine cannot be built or run here, or None when TensorRT and a CUDA GPU are both present."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (no `tensorrt` Python package)"
    except OSError as exc:  # the bindings are there, the libraries they load are not
        return f"TensorRT's Python bindings cannot load its libraries ({exc})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def require_tensorrt(what: str):
    reason = unavailable_reason()
    if reason:
        raise MistralExportError(f"{what} needs TensorRT and a CUDA GPU: {reason}; install it with {INSTALL_HINT}")
    import tensorrt as trt

    return trt


def this_gpu(device: int = 0) -> GpuDescription:
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return GpuDescription(torch.cuda.get_device_name(device), f"{major}.{minor}", trt.__version__, torch.version.cuda)


class _BuildMonitor:
    """TensorRT's IProgressMonitor feeding the build's progress display (phase name and steps)."""

    def __new__(cls, progress):
        import tensorrt as trt

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


def build_engine(onnx_path: Path, out_dir: Path, *, precision: str, config: ModelConfig, cache: dict,
                 onnx_sha256: str, options: EngineOptions, plugin_impl: str, tool_version: str,
                 progress=None) -> tuple[Path, dict]:
    """Build ONNX_PATH into OUT_DIR/model.plan for this GPU; returns the plan's path and its engine.json document
    (written by the caller after the plan is in place)."""
    trt = require_tensorrt("building a TensorRT engine")
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    import mistral_export.plugins.tensorrt  # noqa: F401  (registers the mistral plugins the parser binds nodes to)

    gpu = this_gpu()
    profile = Profile()
    for name, shape in profile_shapes(config, options).items():
        profile.add(name, min=shape["min"], opt=shape["opt"], max=shape["max"])
    timing_cache = str(options.timing_cache) if options.timing_cache else None
    if timing_cache:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
    create_config = CreateConfig(
        profiles=[profile],
        load_timing_cache=timing_cache if timing_cache and Path(timing_cache).exists() else None,
        builder_optimization_level=options.builder_optimization_level,
        # RollingCacheUpdate's output aliases its cache input (in place); TensorRT keeps that behind a preview flag.
        preview_features=[trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03],
        progress_monitor=_BuildMonitor(progress) if progress is not None else None,
    )
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = out_dir / PLAN_FILE
    started = time.perf_counter()
    SaveEngine(EngineFromNetwork(network, create_config, save_timing_cache=timing_cache), str(plan))()
    document = engine_document(precision=precision, config=config, cache=cache, onnx_sha256=onnx_sha256, gpu=gpu,
                               options=options, plugin_impl=plugin_impl, tool_version=tool_version,
                               build_seconds=time.perf_counter() - started)
    return plan, document


# ------------------------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------------------------


class TensorRTRunner(Runner):
    """The runner interface over a TensorRT engine folder (model.plan + engine.json).

    The cache is allocated once per `reset` on the GPU, one [B, Hkv, C, D] tensor per layer and kind, and bound both
    as `past_key_values.*` and as `present.*`: RollingCacheUpdate's output aliases its input, so each step updates the
    cache in place (no copy of the cache per step). Decode steps ([B, 1]) are captured once per batch in a CUDA graph
    and replayed (inputs copied into fixed buffers first); where capture fails, steps run with execute_async_v3.
    """

    def __init__(self, folder: str | Path, device: int = 0, cuda_graphs: bool = True):
        from mistral_export.engines.artifacts import Artifact, read_engine

        self.folder = Path(folder)
        self.engine_doc = read_engine(self.folder)
        if self.engine_doc["backend"] != "tensorrt":
            raise MistralExportError(f"{self.folder}: an {self.engine_doc['backend']} artifact, not a TensorRT engine")
        require_tensorrt("running a TensorRT engine")
        import tensorrt as trt
        import torch
        from polygraphy.backend.trt import EngineFromPath

        for warning in check_compatible(self.engine_doc, this_gpu(device), self.folder / PLAN_FILE):
            log.warning(warning)
        import mistral_export.plugins.tensorrt  # noqa: F401  (JIT plugins run their Python implementation)

        self.config = Artifact(self.folder, self.engine_doc).config.replace(name=self.engine_doc["model"]["name"])
        self.device = torch.device("cuda", device)
        self.engine = EngineFromPath(str(self.folder / PLAN_FILE))()
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self._torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                             trt.int64: torch.int64, trt.int32: torch.int32}
        self.cache_dtype = self._torch_dtype[self.engine.get_tensor_dtype("past_key_values.0.key")]
        self.max_batch, self.max_chunk = tuple(self.engine.get_tensor_profile_shape("input_ids", 0)[2])
        self.cuda_graphs = cuda_graphs
        self._check_aliasing()
        self.batch_size = 0

    def _cache_names(self):
        for i in range(self.config.num_layers):
            for kind in ("key", "value"):
                yield f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"

    def _check_aliasing(self) -> None:
        """present.* must alias past_key_values.* (binding both to one buffer is only safe then)."""
        for past, present in self._cache_names():
            aliased = self.engine.get_aliased_input_tensor(present)
            if aliased is not None and aliased != past:
                raise MistralExportError(f"{self.folder / PLAN_FILE}: output {present} aliases {aliased}, expected {past}")

    def reset(self, batch_size: int) -> None:
        import torch

        if not 1 <= batch_size <= self.max_batch:
            raise MistralExportError(f"{self.folder}: this engine runs batches of 1..{self.max_batch} (--max-batch at "
                                     f"build), got {batch_size}")
        c = self.config
        shape = (batch_size, c.num_kv_heads, self.cache_capacity, c.head_dim)
        self.caches = {past: torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
                       for past, _ in self._cache_names()}
        # Decode-step buffers at fixed addresses (what a captured graph reads and writes).
        self._decode = self._io_buffers(batch_size, 1)
        self._graph = None
        self._graph_failed = not self.cuda_graphs
        self._bound = None
        self.batch_size = batch_size

    def _io_buffers(self, batch: int, seq: int) -> dict:
        import torch

        ids = torch.zeros((batch, seq), dtype=torch.int64, device=self.device)
        positions = torch.zeros((batch,), dtype=torch.int64, device=self.device)
        return {"input_ids": ids, "past_len": positions}

    def _bind(self, io: dict) -> None:
        """Shapes and addresses of one step: inputs, the shared cache buffers, and a logits buffer sized by TensorRT."""
        import torch

        batch, seq = io["input_ids"].shape
        ctx = self.context
        ctx.set_input_shape("input_ids", (batch, seq))
        ctx.set_input_shape("past_len", (batch,))
        ctx.set_tensor_address("input_ids", io["input_ids"].data_ptr())
        ctx.set_tensor_address("past_len", io["past_len"].data_ptr())
        for past, present in self._cache_names():
            ctx.set_input_shape(past, tuple(self.caches[past].shape))
            ctx.set_tensor_address(past, self.caches[past].data_ptr())
            ctx.set_tensor_address(present, self.caches[past].data_ptr())  # aliased: updated in place
        if "logits" not in io:
            dtype = self._torch_dtype[self.engine.get_tensor_dtype("logits")]
            io["logits"] = torch.empty(tuple(ctx.get_tensor_shape("logits")), dtype=dtype, device=self.device)
        ctx.set_tensor_address("logits", io["logits"].data_ptr())
        self._bound = io

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"{self.folder / PLAN_FILE}: TensorRT execute_async_v3 failed (see its log above)")

    def _capture_decode_graph(self) -> None:
        """Capture the decode step once its shapes and addresses are bound (TensorRT needs one plain enqueue after
        shapes change before a capture)."""
        import torch

        self._enqueue()
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self._enqueue()
        except Exception as exc:  # noqa: BLE001 - CUDA reports capture problems as several exception types
            log.warning("CUDA graph capture of the decode step failed (%s); running steps without a graph", exc)
            self._graph_failed = True
            return
        self._graph = graph

    def _step(self, input_ids, past_len):
        import torch

        batch, seq = input_ids.shape
        with torch.cuda.stream(self.stream):
            if seq == 1:
                io = self._decode
                io["input_ids"].copy_(input_ids, non_blocking=True)
                io["past_len"].copy_(past_len, non_blocking=True)
                if self._bound is not io:
                    self._bind(io)
                if self._graph is None and not self._graph_failed:
                    self._capture_decode_graph()
                    # The warm-up enqueue ran this step already; the capture only recorded it.
                    self.stream.synchronize()
                    return io["logits"].float().cpu()
                if self._graph is not None:
                    self._graph.replay()
                else:
                    self._enqueue()
            else:
                if seq > self.max_chunk:
                    raise MistralExportError(f"{self.folder}: this engine runs steps of at most {self.max_chunk} tokens "
                                             f"(--max-chunk at build), got {seq}; prefill in chunks")
                io = self._io_buffers(batch, seq)
                io["input_ids"].copy_(input_ids)
                io["past_len"].copy_(past_len)
                self._bind(io)
                self._enqueue()
            logits = io["logits"].float().cpu()  # synchronizes with the stream
        return logits
