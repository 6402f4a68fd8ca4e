"""ONNX Runtime runner for the exported graph (any ORT build: the `mistral` ops run as function bodies).

The rolling cache lives in OrtValues that stay put between steps: two sets per layer, bound with
I/O binding as past_key_values.* (read) and present.* (written), swapped after each step. A decode
step therefore copies no cache through numpy; only input_ids, past_len and the logits cross.
(Binding present.* to the very OrtValues of past_key_values.* is not safe: the function body of
RollingCacheUpdate is a ScatterElements that ORT may schedule before the attention that reads the
old cache, since the `after` ordering input is unused by the body.)
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from mistral_export.engines.runner import Runner
from mistral_export.errors import MistralExportError
from mistral_export.model.config import ModelConfig
from mistral_export.op_contract import check_positions

_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session_options(threads: int | None = None, spinning: bool = True) -> ort.SessionOptions:
    """`spinning=False`: worker threads sleep between steps instead of spinning, leaving the cores to
    whatever else runs in the process (a server's request handling)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OnnxRuntimeRunner(Runner):
    """Runner over an exported model on ONNX Runtime's CPU (or another) provider.

    By default the session runs model.ort.onnx, the ONNX Runtime artifact written beside model.onnx by
    `export` / `build` (function bodies inlined, per-layer shape/mask arithmetic shared; see
    engines/onnxruntime_artifact.py); a missing or stale artifact is an error naming the command that
    writes it. `portable=True` runs model.onnx exactly as exported (its `mistral` nodes from their bodies).
    """

    def __init__(self, onnx_path: str | Path, threads: int | None = None,
                 providers: list[str] | None = None, portable: bool = False, spinning: bool = True):
        from mistral_export.engines.onnxruntime_artifact import onnxruntime_artifact_for
        from mistral_export.export.onnx_export import read_export_config

        path = Path(onnx_path)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.exists():
            raise MistralExportError(f"{path}: no such ONNX model (run `mistral-export export` first)")
        self.path = path
        self.session_path = path if portable else onnxruntime_artifact_for(path)
        self.config: ModelConfig
        self.config, meta = read_export_config(self.path)
        self.last_token_logits = meta.get("mistral_export.last_token_logits") == "1"
        # The cache's limits as the artifact records them (the deploy stage reads the same keys).
        self._capacity = int(meta.get("mistral_export.cache_capacity", self.config.cache_capacity))
        self._wraps = meta.get("mistral_export.cache_wraps", str(int(self.config.sliding_window is not None))) == "1"
        try:
            self.session = ort.InferenceSession(
                str(self.session_path), sess_options=session_options(threads, spinning),
                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise MistralExportError(f"{self.session_path}: ONNX Runtime cannot load the model: {exc}") from None
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.cache_dtype = _NUMPY_DTYPES[inputs["past_key_values.0.key"].type]
        self.logits_dtype = _NUMPY_DTYPES[next(o.type for o in self.session.get_outputs() if o.name == "logits")]
        self.layers = self.config.num_layers
        self._bindings: list[ort.IOBinding] = []
        self._caches: list[list[ort.OrtValue]] = []  # [set][2*layer + (0 key | 1 value)]
        self._current = 0
        self.batch_size = 0

    @property
    def cache_capacity(self) -> int:
        return self._capacity

    @property
    def cache_wraps(self) -> bool:
        return self._wraps

    def reset(self, batch_size: int) -> None:
        """Two zeroed sets of cache OrtValues [B,Hkv,C,D] per layer (ping-pong between steps)."""
        c = self.config
        shape = (batch_size, c.num_kv_heads, self.cache_capacity, c.head_dim)
        zeros = np.zeros(shape, dtype=self.cache_dtype)
        self._caches = []
        for _ in range(2):
            values = []
            for _ in range(2 * self.layers):
                # ORT-owned buffers (ortvalue_from_numpy would alias the one numpy array in all of them).
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.cache_dtype, self.device, 0)
                value.update_inplace(zeros)
                values.append(value)
            self._caches.append(values)
        # One binding per ping-pong parity, its cache inputs and outputs bound once.
        self._bindings = []
        for parity in range(2):
            read, write = self._caches[parity], self._caches[1 - parity]
            binding = self.session.io_binding()
            for i in range(self.layers):
                binding.bind_ortvalue_input(f"past_key_values.{i}.key", read[2 * i])
                binding.bind_ortvalue_input(f"past_key_values.{i}.value", read[2 * i + 1])
                binding.bind_ortvalue_output(f"present.{i}.key", write[2 * i])
                binding.bind_ortvalue_output(f"present.{i}.value", write[2 * i + 1])
            self._bindings.append(binding)
        self._io_shape = None
        self._slot_bindings: dict[tuple[int, int, int], ort.IOBinding] = {}
        self._current = 0
        self.batch_size = batch_size

    def _bind_io(self, batch: int, seq: int) -> None:
        """input_ids, past_len and logits in numpy buffers that ORT reads and writes in place.

        Bound again only when the step's shape changes (prefill chunk, then decode): a decode step
        then costs two small copies in and one out, not a rebinding and a fresh output each step.
        """
        ids = np.zeros((batch, seq), dtype=np.int64)
        positions = np.zeros(batch, dtype=np.int64)
        logits = np.empty((batch, 1 if self.last_token_logits else seq, self.config.vocab_size), dtype=self.logits_dtype)
        for binding in self._bindings:
            binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(ids))
            binding.bind_ortvalue_input("past_len", ort.OrtValue.ortvalue_from_numpy(positions))
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self._io = ids, positions, logits
        self._io_shape = (batch, seq)

    def cache_arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The current cache as numpy copies (for tests and inspection)."""
        current = self._caches[self._current]
        return [(current[2 * i].numpy(), current[2 * i + 1].numpy()) for i in range(self.layers)]

    def fill_cache(self, arrays: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Overwrite the current cache (benchmarks start at a deep position with a random cache)."""
        current = self._caches[self._current]
        for i, (k, v) in enumerate(arrays):
            current[2 * i].update_inplace(np.ascontiguousarray(k, dtype=self.cache_dtype))
            current[2 * i + 1].update_inplace(np.ascontiguousarray(v, dtype=self.cache_dtype))

    def _step(self, input_ids: Tensor, past_len: Tensor) -> Tensor:
        ids = input_ids.detach().cpu()
        positions = past_len.detach().cpu().numpy()
        if self._io_shape != tuple(ids.shape):
            self._bind_io(*ids.shape)
        ids_buffer, positions_buffer, logits = self._io
        np.copyto(ids_buffer, ids.numpy(), casting="unsafe")
        np.copyto(positions_buffer, positions, casting="unsafe")
        self.session.run_with_iobinding(self._bindings[self._current])
        self._current = 1 - self._current
        return torch.from_numpy(logits.astype(np.float32))  # a copy: the buffer is overwritten next step

    # Slots, for in-flight batching (deploy/scheduler.py). Each sequence of the batch that `reset` allocated
    # owns one slot of every cache tensor; sequences come and go. The scheduler keeps the sequences that
    # decode together in slots 0..n-1 (`move_slot` fills the hole a finished one leaves), so one step over
    # them binds a contiguous [n,Hkv,C,D] view of each cache by pointer, with no copy of the batch cache.
    # A slot's stale contents never need clearing: a sequence starts at position 0 and reads only
    # positions it has written. CPU only: slots are addressed and copied as host memory.

    def step_slots(self, input_ids: Tensor, past_len: Tensor) -> Tensor:
        """One step of the sequences in slots 0..n-1 (n = input_ids.shape[0]); logits [n,S,V].

        Only those slots are kept: afterwards every slot from n on holds undefined values, except the
        slot a `prefill_slot` sequence occupies, which both ping-pong sets carry (so it survives).
        """
        logits = self._run_slots(0, input_ids, past_len)
        self._current = 1 - self._current
        return logits

    def prefill_slot(self, slot: int, input_ids: Tensor, past_len: Tensor) -> Tensor:
        """One step (a prefill chunk) of the one sequence in `slot`; logits [1,S,V]; every other slot is kept."""
        logits = self._run_slots(slot, input_ids, past_len)
        for read, written in zip(self._caches[self._current], self._caches[1 - self._current]):
            self._copy_slot(written, slot, read, slot)  # both sets now agree on this slot
        return logits

    def move_slot(self, source: int, target: int) -> None:
        """Copy the cache of `source` into `target` in both ping-pong sets (the scheduler then frees `source`)."""
        self._check_slots(max(source, target), 1)
        for values in self._caches:
            for value in values:
                self._copy_slot(value, source, value, target)

    def _slot_bytes(self) -> int:
        c = self.config
        return c.num_kv_heads * self.cache_capacity * c.head_dim * np.dtype(self.cache_dtype).itemsize

    def _copy_slot(self, source: ort.OrtValue, source_slot: int, target: ort.OrtValue, target_slot: int) -> None:
        size = self._slot_bytes()
        ctypes.memmove(target.data_ptr() + target_slot * size, source.data_ptr() + source_slot * size, size)

    def _check_slots(self, first: int, count: int) -> None:
        if self.device != "cpu":
            raise MistralExportError("slot steps (in-flight batching) run on the CPU provider only")
        if not self.batch_size:
            raise MistralExportError(f"{type(self).__name__}: slot step before reset(batch_size)")
        if first < 0 or count < 1 or first + count > self.batch_size:
            raise MistralExportError(f"slots {first}..{first + count - 1} are outside the batch of {self.batch_size} "
                                     f"that reset allocated")

    def _run_slots(self, first: int, input_ids: Tensor, past_len: Tensor) -> Tensor:
        count, seq = input_ids.shape
        self._check_slots(first, count)
        if tuple(past_len.shape) != (count,):
            raise MistralExportError(f"past_len must be [{count}] for input_ids {list(input_ids.shape)}, "
                                     f"got {list(past_len.shape)}")
        check_positions(past_len.tolist(), seq, self.cache_capacity, self.cache_wraps)
        binding = self._slot_binding(first, count, self._current)
        ids = np.ascontiguousarray(input_ids.numpy(), dtype=np.int64)  # kept alive until the run: ORT reads them in place
        positions = np.ascontiguousarray(past_len.numpy(), dtype=np.int64)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("past_len", positions)
        logits = np.empty((count, 1 if self.last_token_logits else seq, self.config.vocab_size), dtype=self.logits_dtype)
        binding.bind_output("logits", "cpu", 0, self.logits_dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return torch.from_numpy(logits if logits.dtype == np.float32 else logits.astype(np.float32))

    def _slot_binding(self, first: int, count: int, parity: int) -> ort.IOBinding:
        """A binding of slots first..first+count-1: read from set `parity`, written to the other (cached)."""
        key = (first, count, parity)
        if key not in self._slot_bindings:
            c = self.config
            shape = [count, c.num_kv_heads, self.cache_capacity, c.head_dim]
            offset = first * self._slot_bytes()
            read, write = self._caches[parity], self._caches[1 - parity]
            binding = self.session.io_binding()
            for i in range(self.layers):
                for j, part in enumerate(("key", "value")):
                    binding.bind_input(f"past_key_values.{i}.{part}", "cpu", 0, self.cache_dtype, shape,
                                       read[2 * i + j].data_ptr() + offset)
                    binding.bind_output(f"present.{i}.{part}", "cpu", 0, self.cache_dtype, shape,
                                        write[2 * i + j].data_ptr() + offset)
            self._slot_bindings[key] = binding
        return self._slot_bindings[key]
