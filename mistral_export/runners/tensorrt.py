"""The runner interface over a TensorRT engine folder (model.plan + artifact.json); TensorRT through
`tensorrt_lib.require_tensorrt`, imported when a runner is made."""

from __future__ import annotations

import logging
from pathlib import Path

from mistral_export.artifacts.description import ArtifactDescription
from mistral_export.artifacts.gpu import check_compatible
from mistral_export.errors import MistralExportError
from mistral_export.op_contract import cache_names
from mistral_export.runners.base import Runner
from mistral_export.tensorrt_lib import require_tensorrt, this_gpu

log = logging.getLogger(__name__)


class TensorRTRunner(Runner):
    """The runner interface over a TensorRT engine folder (model.plan + artifact.json).

    The cache is allocated once per `reset` on the GPU, one [B, Hkv, C, D] tensor per layer and kind, and bound both
    as `past_key_values.*` and as `present.*`: RollingCacheUpdate's output aliases its input, so each step updates the
    cache in place (no copy of the cache per step). Decode steps ([n, 1] over slots first..first+n-1) run in an
    execution context of their own per (first, n), whose shapes and addresses never change, captured once in a CUDA
    graph and replayed (inputs copied into fixed buffers first; where capture fails, plain execute_async_v3):
    TensorRT's graphs stay valid only while their context's shapes do, and in-flight batching interleaves prefill
    chunks and decode steps of varying n. Prefill chunks run in one more context. All contexts share one scratch
    buffer (USER_MANAGED device memory): they run one after another on one stream, which TensorRT allows. The slot
    API (step_slots, prefill_slot, move_slot) is the ONNX Runtime runner's, so deploy/scheduler.py batches both in
    flight.
    """

    def __init__(self, folder: str | Path, device: int = 0, cuda_graphs: bool = True):
        self.folder = Path(folder)
        self.description = ArtifactDescription.read(self.folder)
        if self.description.tensorrt is None:
            raise MistralExportError(f"{self.folder}: an {self.description.backend} artifact, not a TensorRT engine")
        trt = require_tensorrt("running a TensorRT engine")
        import torch
        from polygraphy.backend.trt import EngineFromPath

        self.plan = self.folder / self.description.tensorrt.file
        for warning in check_compatible(self.description.tensorrt.gpu_description, this_gpu(device), self.plan):
            log.warning(warning)
        import mistral_export.plugins.tensorrt  # noqa: F401  (JIT plugins run their Python implementation)

        self.config = self.description.config
        self.device = torch.device("cuda", device)
        self.engine = EngineFromPath(str(self.plan))()
        self._trt = trt
        # Scratch memory of every execution context (the largest any profile shape needs), shared (see the class).
        self._scratch = torch.empty(self.engine.device_memory_size_v2, dtype=torch.uint8, device=self.device)
        self.stream = torch.cuda.Stream(self.device)
        self._torch_dtype = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64,
            trt.int32: torch.int32,
        }
        self.cache_dtype = self._torch_dtype[self.engine.get_tensor_dtype("past_key_values.0.key")]
        self.max_batch, self.max_chunk = tuple(self.engine.get_tensor_profile_shape("input_ids", 0)[2])
        self.cuda_graphs = cuda_graphs
        self._check_aliasing()
        self._contexts: dict = {}
        self.batch_size = 0

    def _cache_names(self):
        return cache_names(self.config.num_layers)

    def _check_aliasing(self) -> None:
        """present.* must alias past_key_values.* (binding both to one buffer is only safe then)."""
        for past, present in self._cache_names():
            aliased = self.engine.get_aliased_input_tensor(present)
            if aliased is not None and aliased != past:
                raise MistralExportError(f"{self.plan}: output {present} aliases {aliased}, expected {past}")

    def reset(self, batch_size: int) -> None:
        import torch

        if not 1 <= batch_size <= self.max_batch:
            raise MistralExportError(
                f"{self.folder}: this engine runs batches of 1..{self.max_batch} (--max-batch at "
                f"build), got {batch_size}"
            )
        c = self.config
        shape = (batch_size, c.num_kv_heads, self.cache_capacity, c.head_dim)
        self.caches = {
            past: torch.zeros(shape, dtype=self.cache_dtype, device=self.device) for past, _ in self._cache_names()
        }
        # Per decode key (first slot, count): its context, bound once to buffers at fixed addresses (what its captured
        # graph reads and writes), and the graph (None where capture failed). Rebuilt after each reset (new caches).
        self._contexts = {}
        self._decode: dict[tuple[int, int], dict] = {}
        self._graphs: dict[tuple[int, int], object] = {}
        self.batch_size = batch_size

    # Slots, for in-flight batching (deploy/scheduler.py), as runners/onnxruntime.py has them: each sequence owns one
    # slot (batch row) of the caches `reset` allocated; a step over slots first..first+n-1 binds [n, Hkv, C, D] views
    # of each cache by address (rows of one batch are contiguous), so no cache is copied per step.

    def step_slots(self, input_ids, past_len):
        """One step of the sequences in slots 0..n-1 (n = input_ids.shape[0]); logits [n,S,V] fp32 on the CPU."""
        return self._run_slots(0, input_ids, past_len)

    def prefill_slot(self, slot: int, input_ids, past_len):
        """One step (a prefill chunk) of the one sequence in `slot`; logits [1,S,V]."""
        return self._run_slots(slot, input_ids, past_len)

    def move_slot(self, source: int, target: int) -> None:
        """Copy the cache of `source` into `target` on the GPU (the scheduler then frees `source`)."""
        import torch

        self._check_slots(max(source, target), 1)
        with torch.cuda.stream(self.stream):
            for cache in self.caches.values():
                cache[target].copy_(cache[source], non_blocking=True)

    def _run_slots(self, first: int, input_ids, past_len):
        self._check_slots(first, input_ids.shape[0])
        self._check_step(input_ids, past_len, input_ids.shape[0], f"slots from {first}")
        return self._run(first, input_ids, past_len)

    def _step(self, input_ids, past_len):
        return self._run(0, input_ids, past_len)

    def _io_buffers(self, batch: int, seq: int) -> dict:
        import torch

        ids = torch.zeros((batch, seq), dtype=torch.int64, device=self.device)
        positions = torch.zeros((batch,), dtype=torch.int64, device=self.device)
        return {"input_ids": ids, "past_len": positions}

    def _context(self, key):
        """The execution context of KEY ((first, n) for decode, "prefill"), made on first use with the shared scratch."""
        if key not in self._contexts:
            ctx = self.engine.create_execution_context(self._trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            ctx.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
            self._contexts[key] = ctx
        return self._contexts[key]

    def _bind(self, ctx, first: int, io: dict) -> None:
        """Shapes and addresses of one step over slots first..first+B-1 in CTX: inputs, those rows of the cache
        buffers (as both past_key_values.* and present.*), and a logits buffer sized by TensorRT."""
        import torch

        batch, seq = io["input_ids"].shape
        ctx.set_input_shape("input_ids", (batch, seq))
        ctx.set_input_shape("past_len", (batch,))
        ctx.set_tensor_address("input_ids", io["input_ids"].data_ptr())
        ctx.set_tensor_address("past_len", io["past_len"].data_ptr())
        for past, present in self._cache_names():
            rows = self.caches[past][first : first + batch]
            ctx.set_input_shape(past, tuple(rows.shape))
            ctx.set_tensor_address(past, rows.data_ptr())
            ctx.set_tensor_address(present, rows.data_ptr())  # aliased: updated in place
        if "logits" not in io:
            dtype = self._torch_dtype[self.engine.get_tensor_dtype("logits")]
            io["logits"] = torch.empty(tuple(ctx.get_tensor_shape("logits")), dtype=dtype, device=self.device)
        ctx.set_tensor_address("logits", io["logits"].data_ptr())

    def _enqueue(self, ctx) -> None:
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"{self.plan}: TensorRT execute_async_v3 failed (see its log above)")

    def _capture_decode_graph(self, ctx):
        """A CUDA graph of CTX's decode step, or None where capture fails. TensorRT needs one plain enqueue after
        shapes are set before a capture: that enqueue runs this step; the capture only records it."""
        import torch

        self._enqueue(ctx)
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self._enqueue(ctx)
        except Exception as exc:  # noqa: BLE001 - CUDA reports capture problems as several exception types
            log.warning("CUDA graph capture of the decode step failed (%s); running steps without a graph", exc)
            return None
        return graph

    def _run(self, first: int, input_ids, past_len):
        """Slots first..first+B-1 run tokens [B,S] at past_len [B]; their cache rows are updated in place; logits
        [B,S,V] fp32 on the CPU. Per decode step the host sends the tokens and positions (B int64 each) and receives
        the logits; the cache never leaves the GPU."""
        import torch

        batch, seq = input_ids.shape
        if seq > self.max_chunk:
            raise MistralExportError(
                f"{self.folder}: this engine runs steps of at most {self.max_chunk} tokens "
                f"(--max-chunk at build), got {seq}; prefill in chunks"
            )
        with torch.cuda.stream(self.stream):
            if seq > 1:
                ctx, io = self._context("prefill"), self._io_buffers(batch, seq)
                io["input_ids"].copy_(input_ids, non_blocking=True)
                io["past_len"].copy_(past_len, non_blocking=True)
                self._bind(ctx, first, io)
                self._enqueue(ctx)
            else:
                key = (first, batch)
                ctx = self._context(key)
                io = self._decode.get(key)
                if io is None:
                    io = self._decode[key] = self._io_buffers(batch, 1)
                    self._bind(ctx, first, io)
                io["input_ids"].copy_(input_ids, non_blocking=True)
                io["past_len"].copy_(past_len, non_blocking=True)
                if key not in self._graphs and self.cuda_graphs:
                    self._graphs[key] = self._capture_decode_graph(ctx)  # ran this step (see there)
                elif self._graphs.get(key) is not None:
                    self._graphs[key].replay()
                else:
                    self._enqueue(ctx)
            logits = io["logits"].float().cpu()  # synchronizes with the stream
        return logits
