"""Weights as ONNX external data, written tensor by tensor.

The graph is traced from a weightless skeleton; each initializer that stands for a checkpoint
tensor gets a slot in one data file, laid out before any weight is read. The checkpoint is then
streamed through once (one tensor in memory at a time, transposed for MatMul when needed) and
each tensor written at its offset, so export never holds the weights, let alone two copies.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import torch
from torch import Tensor

from mistral_export.errors import MistralExportError

ALIGNMENT = 4096  # page-aligned offsets let runtimes mmap each tensor
BLOCK_BYTES = 64 << 20  # transposed weights are written in blocks of about this size


@dataclass(frozen=True)
class WeightSlot:
    initializer: str  # ONNX initializer name
    source: str  # internal parameter name (checkpoint tensor)
    transpose: bool  # stored as source.T (MatMul layout [in, out])
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    length: int


def _torch_to_ir_dtype(dtype: torch.dtype) -> ir.DataType:
    return {
        torch.float32: ir.DataType.FLOAT,
        torch.float16: ir.DataType.FLOAT16,
        torch.bfloat16: ir.DataType.BFLOAT16,
    }[dtype]


def plan_layout(entries: Iterable[tuple[str, str, bool, tuple[int, ...]]], dtype: torch.dtype) -> list[WeightSlot]:
    """Offsets in the data file for (initializer, source, transpose, shape) entries, page aligned."""
    slots, offset = [], 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for initializer, source, transpose, shape in entries:
        length = itemsize
        for dim in shape:
            length *= dim
        slots.append(WeightSlot(initializer, source, transpose, tuple(shape), dtype, offset, length))
        offset += -(-length // ALIGNMENT) * ALIGNMENT
    return slots


def write_weights(path: Path, slots: list[WeightSlot], tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Stream (source name, tensor) pairs into `path` at their planned offsets."""
    by_source: dict[str, list[WeightSlot]] = {}
    for slot in slots:
        by_source.setdefault(slot.source, []).append(slot)
    written: set[str] = set()
    total = max((s.offset + s.length for s in slots), default=0)
    with open(path, "wb") as handle:
        handle.truncate(total)
        for name, tensor in tensors:
            for slot in by_source.get(name, ()):
                data = tensor.detach()
                shape = tuple(data.t().shape) if slot.transpose else tuple(data.shape)
                if shape != slot.shape:
                    raise MistralExportError(
                        f"weight '{name}' has shape {list(shape)}, the traced graph expects {list(slot.shape)}")
                handle.seek(slot.offset)
                # Row blocks, so no converted or transposed copy of a large tensor is ever whole in memory.
                rows_of = data.t() if slot.transpose else data
                row_bytes = max(1, rows_of[0].numel() * 4) if rows_of.dim() > 1 else BLOCK_BYTES
                rows = max(1, BLOCK_BYTES // row_bytes) if rows_of.dim() > 1 else max(1, rows_of.shape[0])
                for start in range(0, max(1, rows_of.shape[0]), rows):
                    _write(handle, rows_of[start:start + rows].to("cpu", slot.dtype).contiguous())
                written.add(slot.initializer)
                del data
            del tensor
    missing = [s.source for s in slots if s.initializer not in written]
    if missing:
        os.unlink(path)
        raise MistralExportError(f"weights missing for: {', '.join(missing[:5])}")


def _write(handle, data: Tensor) -> None:
    # A view of the tensor's own memory: no extra copy on the way to the file.
    if data.numel():
        handle.write(memoryview(data.view(torch.uint8).numpy()))


def external_tensor(slot: WeightSlot, data_file: Path) -> ir.ExternalTensor:
    return ir.ExternalTensor(
        data_file.name, slot.offset, slot.length, _torch_to_ir_dtype(slot.dtype),
        shape=ir.Shape(slot.shape), name=slot.initializer, base_dir=str(data_file.parent),
    )
