"""ONNX Runtime runner for the exported graph (any ORT build: the `mistral` ops run as function bodies).

The cache is one numpy array the runner owns, [2 * layers, B, Hkv, C, D] (key, value per layer), bound to
the session by pointer: a step copies no cache through Python. The ONNX Runtime artifact updates it in
place (engines/onnxruntime/attention.py: GroupQueryAttention, whose `present.*` are bound to the very
memory of `past_key_values.*`), in the layout that kernel keeps. The portable model.onnx
(`portable=True`) returns the whole updated ring as new `present.*` tensors, written to a second buffer
and copied back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from mistral_export.artifacts.description import DESCRIPTION_FILE, SOURCE_ONNX_KEY, ArtifactDescription
from mistral_export.errors import MistralExportError
from mistral_export.model.config import ModelConfig
from mistral_export.op_contract import cache_names
from mistral_export.runners.base import Runner

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


@dataclass
class _Bound:
    """An I/O binding for one (first slot, count, sequence length), with the host buffers it points at."""

    binding: ort.IOBinding
    ids: np.ndarray
    positions: np.ndarray
    logits: np.ndarray
    written: np.ndarray | None  # [2 * layers, count, Hkv, C, D]: the new caches (portable graph)


MAX_BINDINGS = 16  # kept per runner (decode shapes and recent prefill chunk lengths)


class OnnxRuntimeRunner(Runner):
    """Runner over an ONNX Runtime artifact folder (artifact.json, model.ort.onnx, model.onnx) on ONNX Runtime's CPU
    (or another) provider.

    Everything it needs comes from the artifact's artifact.json (config, cache, logits shape) and the file it names:
    the ONNX Runtime artifact written beside model.onnx by `export` / `build` (GroupQueryAttention per layer, the
    cache updated in place; see engines/onnxruntime/). `portable=True` runs model.onnx exactly as exported (its
    `mistral` nodes from their bodies). The cache is host memory whatever the provider (another provider copies
    it in at each step).
    """

    def __init__(
        self,
        folder: str | Path,
        threads: int | None = None,
        providers: list[str] | None = None,
        portable: bool = False,
        spinning: bool = True,
    ):
        folder = Path(folder)
        if folder.suffix == ".onnx":  # a model.onnx path names its folder
            folder = folder.parent
        hint = f"`mistral-export export MODEL -o {folder}` (or `build`) writes one"
        if not (folder / DESCRIPTION_FILE).exists():
            raise MistralExportError(f"{folder}: no ONNX Runtime artifact here (no {DESCRIPTION_FILE}); {hint}")
        self.description = ArtifactDescription.read(folder)
        if self.description.onnxruntime is None:
            raise MistralExportError(
                f"{folder / DESCRIPTION_FILE}: a {self.description.backend} artifact, not an ONNX Runtime one"
            )
        self.folder = folder
        self.session_path = folder / ("model.onnx" if portable else self.description.onnxruntime.file)
        self.config: ModelConfig = self.description.config
        self.last_token_logits = self.description.last_token_logits
        try:
            self.session = ort.InferenceSession(
                str(self.session_path),
                sess_options=session_options(threads, spinning),
                providers=providers or ["CPUExecutionProvider"],
            )
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise MistralExportError(f"{self.session_path}: ONNX Runtime cannot load the model: {exc}") from None
        source = self.session.get_modelmeta().custom_metadata_map.get(SOURCE_ONNX_KEY)
        if not portable and source != self.description.onnx_sha256:  # both recorded at build: nothing re-hashed
            raise MistralExportError(
                f"{self.session_path}: made from another model.onnx than {DESCRIPTION_FILE} records "
                f"(stale); {hint} again"
            )
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.cache_dtype = _NUMPY_DTYPES[inputs["past_key_values.0.key"].type]
        self.logits_dtype = _NUMPY_DTYPES[next(o.type for o in self.session.get_outputs() if o.name == "logits")]
        self.layers = self.config.num_layers
        self._in_place = not portable and self.description.onnxruntime.cache_in_place
        self._inputs = [past for past, _ in cache_names(self.layers)]
        self._outputs = [present for _, present in cache_names(self.layers)]
        self._cache = np.zeros((0,), dtype=self.cache_dtype)
        self._bound: dict[tuple[int, int, int], _Bound] = {}
        self.batch_size = 0

    def reset(self, batch_size: int) -> None:
        """A zeroed cache [2 * layers, B, Hkv, C, D]."""
        c = self.config
        self._cache = np.zeros(
            (2 * self.layers, batch_size, c.num_kv_heads, self.cache_capacity, c.head_dim), dtype=self.cache_dtype
        )
        self._bound = {}  # their pointers are into the old cache
        self.batch_size = batch_size

    def cache_arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The current cache as numpy copies (for tests and inspection)."""
        return [(self._cache[2 * i].copy(), self._cache[2 * i + 1].copy()) for i in range(self.layers)]

    def fill_cache(self, arrays: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Overwrite the current cache (benchmarks start at a deep position with a random cache)."""
        for i, (k, v) in enumerate(arrays):
            np.copyto(self._cache[2 * i], k, casting="same_kind")
            np.copyto(self._cache[2 * i + 1], v, casting="same_kind")

    def _step(self, input_ids: Tensor, past_len: Tensor) -> Tensor:
        return self._run(0, input_ids, past_len)

    # Slots, for in-flight batching (deploy/scheduler.py). Each sequence of the batch that `reset` allocated
    # owns one slot of the cache; sequences come and go. The scheduler keeps the sequences that decode
    # together in slots 0..n-1 (`move_slot` fills the hole a finished one leaves), so one step over them binds
    # a contiguous [n,Hkv,C,D] view of each layer's cache by pointer, with no copy of the batch cache. A step
    # writes only its own slots. A slot's stale contents never need clearing: a sequence starts at position 0
    # and reads only positions it has written.

    def step_slots(self, input_ids: Tensor, past_len: Tensor) -> Tensor:
        """One step of the sequences in slots 0..n-1 (n = input_ids.shape[0]); logits [n,S,V]."""
        return self._run_slots(0, input_ids, past_len)

    def prefill_slot(self, slot: int, input_ids: Tensor, past_len: Tensor) -> Tensor:
        """One step (a prefill chunk) of the one sequence in `slot`; logits [1,S,V]."""
        return self._run_slots(slot, input_ids, past_len)

    def move_slot(self, source: int, target: int) -> None:
        """Copy the cache of `source` into `target` (the scheduler then frees `source`)."""
        self._check_slots(max(source, target), 1)
        self._cache[:, target] = self._cache[:, source]

    def _run_slots(self, first: int, input_ids: Tensor, past_len: Tensor) -> Tensor:
        self._check_slots(first, input_ids.shape[0])
        self._check_step(input_ids, past_len, input_ids.shape[0], f"slots from {first}")
        return self._run(first, input_ids, past_len)

    def _run(self, first: int, input_ids: Tensor, past_len: Tensor) -> Tensor:
        """Slots first..first+B-1 run tokens [B,S] at past_len [B]; their cache is updated; logits [B,S,V] fp32."""
        count, seq = input_ids.shape
        bound = self._binding(first, count, seq)
        np.copyto(bound.ids, input_ids.detach().cpu().numpy(), casting="unsafe")
        np.copyto(bound.positions, past_len.detach().cpu().numpy(), casting="unsafe")
        self.session.run_with_iobinding(bound.binding)
        if bound.written is not None:
            self._cache[:, first : first + count] = bound.written
        return torch.from_numpy(bound.logits.astype(np.float32))  # a copy: the buffer is overwritten next step

    def _binding(self, first: int, count: int, seq: int) -> _Bound:
        key = (first, count, seq)
        if key in self._bound:
            return self._bound[key]
        if len(self._bound) >= MAX_BINDINGS:
            self._bound.clear()
        c = self.config
        shape = (2 * self.layers, count, *self._cache.shape[2:])
        written = None if self._in_place else np.empty(shape, self.cache_dtype)
        bound = _Bound(
            binding=self.session.io_binding(),
            ids=np.zeros((count, seq), dtype=np.int64),
            positions=np.zeros(count, dtype=np.int64),
            logits=np.empty((count, 1 if self.last_token_logits else seq, c.vocab_size), self.logits_dtype),
            written=written,
        )
        binding = bound.binding
        binding.bind_input("input_ids", "cpu", 0, np.int64, [count, seq], bound.ids.ctypes.data)
        binding.bind_input("past_len", "cpu", 0, np.int64, [count], bound.positions.ctypes.data)
        binding.bind_output("logits", "cpu", 0, self.logits_dtype, list(bound.logits.shape), bound.logits.ctypes.data)
        for j, (past, present) in enumerate(zip(self._inputs, self._outputs)):
            view = self._cache[j, first : first + count]
            target = view if written is None else written[j]
            binding.bind_input(past, "cpu", 0, self.cache_dtype, list(view.shape), view.ctypes.data)
            binding.bind_output(present, "cpu", 0, self.cache_dtype, list(target.shape), target.ctypes.data)
        self._bound[key] = bound
        return bound
