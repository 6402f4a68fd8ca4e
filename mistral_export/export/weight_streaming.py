"""Weights as ONNX external data, written tensor by tensor.

The graph is traced from a weightless skeleton; each initializer that stands for checkpoint
tensors gets a slot in one data file, laid out before any weight is read. The checkpoint is then
streamed through once (one tensor in memory at a time, transposed for MatMul when needed) and
each tensor written at its offset, so export never holds the weights, let alone two copies.
A slot may hold several tensors side by side along its last axis (the fused projections of
MatMuls that share an input); each is then written row by row at its column.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import Tensor

from mistral_export.errors import MistralExportError

ALIGNMENT = 4096  # page-aligned offsets let runtimes mmap each tensor
BLOCK_BYTES = 64 << 20  # transposed weights are written in blocks of about this size


@dataclass(frozen=True)
class WeightSlot:
    initializer: str  # ONNX initializer name
    sources: tuple[str, ...]  # internal parameter names (checkpoint tensors), side by side on the last axis
    widths: tuple[int, ...]  # each source's extent along the last axis, as stored
    transpose: bool  # each source stored as source.T (MatMul layout [in, out])
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    length: int


def _torch_to_ir_dtype(dtype: torch.dtype) -> ir.DataType:
    return {
        torch.float32: ir.DataType.FLOAT,
        torch.float16: ir.DataType.FLOAT16,
        torch.bfloat16: ir.DataType.BFLOAT16,
        torch.int8: ir.DataType.INT8,
        torch.int4: ir.DataType.INT4,
        torch.float8_e4m3fn: ir.DataType.FLOAT8E4M3FN,
    }[dtype]


def _storage(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """(the dtype of the bytes written, elements per stored item). INT4 is stored as ONNX packs it, two values a byte
    along the last axis (low nibble first); its source tensors arrive packed already, as uint8 (int4.Int4Weights)."""
    return (torch.uint8, 2) if dtype == torch.int4 else (dtype, 1)


def plan_layout(
    entries: Iterable[tuple[str, tuple[str, ...], tuple[int, ...], bool, tuple[int, ...]]],
    dtype: torch.dtype,
    dtypes: dict[str, torch.dtype] | None = None,
) -> list[WeightSlot]:
    """Offsets in the data file for (initializer, sources, widths, transpose, shape) entries, page aligned;
    each slot in `dtype` unless `dtypes` names another for its initializer (int8 weights)."""
    slots, offset = [], 0
    for initializer, sources, widths, transpose, shape in entries:
        dtype_here = (dtypes or {}).get(initializer, dtype)
        stored, per_item = _storage(dtype_here)
        if sum(widths) != shape[-1]:
            raise AssertionError(f"{initializer}: source widths {widths} do not fill its last dim {shape[-1]}")
        if per_item > 1 and any(width % per_item for width in widths):
            raise AssertionError(f"{initializer}: packed source widths {widths} must be multiples of {per_item}")
        length = torch.empty((), dtype=stored).element_size()
        for dim in shape:
            length *= dim
        length //= per_item
        slots.append(
            WeightSlot(initializer, tuple(sources), tuple(widths), transpose, tuple(shape), dtype_here, offset, length)
        )
        offset += -(-length // ALIGNMENT) * ALIGNMENT
    return slots


def write_weights(path: Path, slots: list[WeightSlot], tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Stream (source name, tensor) pairs into `path` at their planned offsets."""
    parts: dict[str, list[tuple[WeightSlot, int, int]]] = {}  # source -> (slot, column, width)
    for slot in slots:
        column = 0
        for source, width in zip(slot.sources, slot.widths):
            parts.setdefault(source, []).append((slot, column, width))
            column += width
    written: set[tuple[str, str]] = set()
    total = max((s.offset + s.length for s in slots), default=0)
    with open(path, "wb") as handle:
        handle.truncate(total)
        for name, tensor in tensors:
            for slot, column, width in parts.get(name, ()):
                data = tensor.detach()
                shape = tuple(data.t().shape) if slot.transpose else tuple(data.shape)
                expected = (*slot.shape[:-1], width // _storage(slot.dtype)[1])
                if shape != expected:
                    raise MistralExportError(
                        f"weight '{name}' has shape {list(shape)}, the traced graph expects {list(expected)}"
                    )
                # Row blocks, so no converted or transposed copy of a large tensor is ever whole in memory.
                rows_of = data.t() if slot.transpose else data
                if rows_of.dim() < 2:
                    handle.seek(slot.offset)
                    _write(handle, rows_of.to("cpu", _storage(slot.dtype)[0]).contiguous())
                else:
                    _write_rows(handle, slot, rows_of, column)
                written.add((slot.initializer, name))
                del data, rows_of
            del tensor  # nothing of it may outlive the loop body: the source computes the next tensor meanwhile
    missing = [
        f"{source} ({s.initializer})" for s in slots for source in s.sources if (s.initializer, source) not in written
    ]
    if missing:
        os.unlink(path)
        raise MistralExportError(f"weights missing for: {', '.join(missing[:5])}")


def _write_rows(handle, slot: WeightSlot, rows_of: Tensor, column: int) -> None:
    """Rows of a 2-D source into its slot, at `column` (in elements) of each of the slot's rows."""
    stored, per_item = _storage(slot.dtype)
    itemsize = torch.empty((), dtype=stored).element_size()
    row_bytes = slot.shape[-1] // per_item * itemsize
    column //= per_item
    whole_rows = rows_of.shape[1] == slot.shape[-1] // per_item
    rows = max(1, BLOCK_BYTES // max(1, rows_of.shape[1] * 4))
    for start in range(0, rows_of.shape[0], rows):
        block = rows_of[start : start + rows].to("cpu", stored).contiguous()
        if whole_rows:
            handle.seek(slot.offset + start * row_bytes)
            _write(handle, block)
            continue
        for i, row in enumerate(block):
            handle.seek(slot.offset + (start + i) * row_bytes + column * itemsize)
            _write(handle, row)


def _write(handle, data: Tensor) -> None:
    # A view of the tensor's own memory: no extra copy on the way to the file.
    if data.numel():
        handle.write(memoryview(data.view(torch.uint8).numpy()))


def external_tensor(slot: WeightSlot, data_file: Path) -> ir.ExternalTensor:
    return ir.ExternalTensor(
        data_file.name,
        slot.offset,
        slot.length,
        _torch_to_ir_dtype(slot.dtype),
        shape=ir.Shape(slot.shape),
        name=slot.initializer,
        base_dir=str(data_file.parent),
    )


def append_external(data_file: Path, array: np.ndarray, name: str) -> ir.ExternalTensor:
    """ARRAY written at the next aligned offset past the end of DATA_FILE (after the planned slots: values computed
    while the weights streamed, such as INT4's block scales), as an external tensor."""
    with open(data_file, "r+b") as handle:
        offset = -(-handle.seek(0, os.SEEK_END) // ALIGNMENT) * ALIGNMENT
        handle.seek(offset)
        handle.write(np.ascontiguousarray(array).tobytes())
    return ir.ExternalTensor(
        data_file.name,
        offset,
        array.nbytes,
        ir.DataType.from_numpy(array.dtype),
        shape=ir.Shape(array.shape),
        name=name,
        base_dir=str(data_file.parent),
    )
