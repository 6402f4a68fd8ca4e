"""Quantized GEMM weights written as the weights stream, in the explicit Q/DQ form a strongly typed TensorRT engine
reads: the common part of the int8, int4 and fp8 weight transforms that `export_graph` (onnx_export) takes.

A precision says which GEMM slots it stores in which dtype (`storage`) and how one source tensor is quantized
(`quantize`: the stored values and their scales); each weight is quantized the moment it streams past and written
into its slot of model.onnx.data, so nothing holds more than one weight and no fp16 copy of the model is written
first. Once the data file is complete, each quantized initializer becomes DequantizeLinear(values, scales, zero
points of the values' type) feeding its MatMul, and the precision may add an activation Q/DQ pair before it
(`quantize_activation`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
from torch import Tensor

from mistral_export.export.precision.onnx_weights import add_initializer
from mistral_export.export.weight_streaming import WeightSlot, append_external

IR_TYPES = {torch.int8: ir.DataType.INT8, torch.int4: ir.DataType.INT4, torch.float8_e4m3fn: ir.DataType.FLOAT8E4M3FN}
EXTERNAL_SCALE_BYTES = 64 << 10  # scales this large go to the data file beside the weights
ZERO_POINT_TYPES = {torch.int8: np.int8, torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn}  # INT4's blocks take none


class QuantizedWeights:
    """Base of a precision's weight transform; subclasses define `storage`, `quantize` and `describe`, and may
    override `dequantize_attributes`, `zero_point` and `quantize_activation`."""

    def __init__(self) -> None:
        self.scales: dict[str, np.ndarray] = {}  # source tensor → its scales (last axis: its output channels)
        self.sources: dict[str, torch.dtype] = {}  # source tensor → the dtype it is stored in

    def describe(self) -> str:
        raise NotImplementedError

    def storage(self, sources: tuple[str, ...]) -> torch.dtype | None:
        """The dtype a GEMM slot holding SOURCES is stored in; None: left in the trace dtype."""
        raise NotImplementedError

    def quantize(self, weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, np.ndarray]:
        """WEIGHT [N, K] (a Linear's, fp32 or as stored) → (its stored form, written transposed: [N, K] in DTYPE's
        storage, INT4 packed as [N/2, K] uint8; scales whose last axis is N)."""
        raise NotImplementedError

    def dequantize_attributes(self, slot: WeightSlot) -> dict:
        return {"axis": 1}

    def zero_point(self, scale: np.ndarray, dtype: torch.dtype) -> np.ndarray | None:
        """DequantizeLinear's zero points for SCALE (0 in the values' type), None for none."""
        return np.zeros(scale.shape, dtype=ZERO_POINT_TYPES[dtype]) if dtype in ZERO_POINT_TYPES else None

    def quantize_activation(self, graph: ir.Graph, matmul: ir.Node, slot: WeightSlot) -> None:
        """Add a Q/DQ pair on MATMUL's activation (W8A8, FP8); weight-only precisions add none."""

    # The protocol export_graph calls.

    def slot_dtypes(self, entries) -> dict[str, torch.dtype]:
        dtypes = {}
        for initializer, sources, _, transposed, _ in entries:
            dtype = self.storage(tuple(sources)) if transposed else None
            if dtype is not None:
                dtypes[initializer] = dtype
                self.sources.update({source: dtype for source in sources})
        return dtypes

    def stream(self, tensors: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        for name, tensor in tensors:
            if name in self.sources:
                tensor, self.scales[name] = self.quantize(tensor, self.sources[name])
            yield name, tensor

    def places(self, slot: WeightSlot) -> bool:
        return slot.dtype in IR_TYPES

    def place(self, graph: ir.Graph, slot: WeightSlot, external: ir.ExternalTensor) -> None:
        name = slot.initializer
        value = graph.initializers.pop(name)
        float_type = value.type
        q = ir.Value(name=f"{name}_quantized", shape=ir.Shape(slot.shape), type=ir.TensorType(IR_TYPES[slot.dtype]))
        external.name = q.name
        q.const_value = external
        graph.register_initializer(q)
        scale = np.concatenate([self.scales.pop(source) for source in slot.sources], axis=-1)
        if scale.nbytes >= EXTERNAL_SCALE_BYTES:  # INT4's block scales: 1/64 of the weights' bytes, not in model.onnx
            s = ir.Value(
                name=f"{name}_scale",
                shape=ir.Shape(scale.shape),
                type=ir.TensorType(ir.DataType.from_numpy(scale.dtype)),
            )
            s.const_value = append_external(Path(external.base_dir) / external.location, scale, s.name)
            graph.register_initializer(s)
        else:
            s = add_initializer(graph, f"{name}_scale", scale)
        inputs = [q, s]
        zero = self.zero_point(scale, slot.dtype)
        if zero is not None:
            inputs.append(add_initializer(graph, f"{name}_zero_point", zero))
        dq = ir.node("DequantizeLinear", inputs, self.dequantize_attributes(slot))
        dq.outputs[0].name = f"{name}_DequantizeLinear_Output"
        dq.outputs[0].shape, dq.outputs[0].type = value.shape, float_type
        matmul = value.uses()[0].node
        graph.insert_before(matmul, dq)
        value.replace_all_uses_with(dq.outputs[0])
        self.quantize_activation(graph, matmul, slot)


def quantize_activation(graph: ir.Graph, matmul: ir.Node, scale: np.ndarray, zero: np.ndarray, name: str) -> None:
    """MATMUL's activation x → DequantizeLinear(QuantizeLinear(x, SCALE, ZERO)) (one static scale per tensor)."""
    x = matmul.inputs[0]
    s = add_initializer(graph, f"{name}_input_scale", scale)
    z = add_initializer(graph, f"{name}_input_zero_point", zero)
    q = ir.node("QuantizeLinear", [x, s, z])
    dq = ir.node("DequantizeLinear", [q.outputs[0], s, z])
    q.outputs[0].name, dq.outputs[0].name = (
        f"{name}_input_QuantizeLinear_Output",
        f"{name}_input_DequantizeLinear_Output",
    )
    q.outputs[0].shape, q.outputs[0].type = x.shape, ir.TensorType(ir.DataType.from_numpy(zero.dtype))
    dq.outputs[0].shape, dq.outputs[0].type = x.shape, x.type
    graph.insert_before(matmul, [q, dq])
    matmul.replace_input_with(0, dq.outputs[0])
