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
    cache in place (no copy of the cache per step). Decode steps ([B, 1]) are captured once per batch in a CUDA graph
    and replayed (inputs copied into fixed buffers first); where capture fails, steps run with execute_async_v3.
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
            raise RuntimeError(f"{self.plan}: TensorRT execute_async_v3 failed (see its log above)")

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
