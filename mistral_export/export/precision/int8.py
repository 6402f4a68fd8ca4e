"""INT8 weights (and W8A8's activation Q/DQ) written as the weights stream, in the explicit Q/DQ form a strongly
typed TensorRT engine reads.

Each GEMM weight is quantized the moment it is streamed (int8, symmetric, one scale per output channel, from its
fp16 value: the trace dtype) and written into its slot of model.onnx.data; then its initializer becomes
DequantizeLinear(int8, scale, zero point 0, axis 1) feeding the MatMul. For W8A8 the MatMul's activation also
gets QuantizeLinear/DequantizeLinear with one static symmetric scale from the calibration's range. Nothing holds
more than one weight, and no fp16 copy of the model is written first.

The numbers are ONNX Runtime's `quantize_static` ones (QDQ, per-channel symmetric INT8, MinMax ranges), which
this project used before: `quantize_data`'s scale (2·absmax / 254 in float64, stored in the weight's fp16) and
rounding (round half to even of w / scale in fp32), vectorized over channels here because ORT loops over them in
Python and, above all, holds the whole model (quantize_static loads its shape-inferred copy with every weight,
the calibrator loads a second, writes an augmented copy to disk and opens an InferenceSession on it: a third)
where this streams.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import onnx_ir as ir
import torch
from torch import Tensor

from mistral_export.export.precision.onnx_weights import INT8_MAX, add_initializer
from mistral_export.export.weight_streaming import WeightSlot

BLOCK_ELEMENTS = 1 << 23  # rows quantized together: 32 MiB of fp32 temporaries


def symmetric_scales(absmax: np.ndarray) -> np.ndarray:
    """fp16 scales for ranges [-absmax, absmax] onto [-127, 127], as ORT's compute_scale_zp (1 for a zero range)."""
    scale = (2.0 * absmax.astype(np.float64) / (2 * INT8_MAX)).astype(np.float16)
    return np.where(scale < np.finfo(np.float16).smallest_subnormal, np.float16(1.0), scale).astype(np.float16)


def quantize_per_output_channel(weight: Tensor) -> tuple[Tensor, np.ndarray]:
    """WEIGHT [N, K] (as the fp16 graph holds it) → int8 [N, K] and fp16 scales [N], one per output channel; in
    blocks of rows, so the float temporaries stay small whatever the tensor."""
    rows, cols = weight.shape
    quantized = torch.empty((rows, cols), dtype=torch.int8)
    scales = np.empty(rows, dtype=np.float16)
    step = max(1, BLOCK_ELEMENTS // max(1, cols))
    for start in range(0, rows, step):
        w16 = weight[start : start + step].detach().to("cpu", torch.float16)
        block_scales = symmetric_scales(w16.abs().amax(1).numpy())
        divided = w16.float().div_(torch.from_numpy(block_scales.astype(np.float32)).unsqueeze(1))
        quantized[start : start + step] = divided.round_().clamp_(-INT8_MAX - 1, INT8_MAX).to(torch.int8)
        scales[start : start + step] = block_scales
    return quantized, scales


class Int8Weights:
    """The weight transform of the INT8 precisions for `export_graph`: GEMM weights (the MatMul slots, stored
    transposed) int8 as they stream, then DequantizeLinear in the graph; with `activation_max` (W8A8, Linear name →
    max |x| over calibration, filled while the stream runs) also the activation's Q/DQ pair."""

    def __init__(self, activation_max: dict[str, float] | None = None):
        self.activation_max = activation_max
        self.scales: dict[str, np.ndarray] = {}  # source tensor → its fp16 scales

    def describe(self) -> str:
        return "int8 GEMM weights" + (" and activation Q/DQ" if self.activation_max is not None else "")

    def slot_dtypes(self, entries) -> dict[str, torch.dtype]:
        self.quantized = {source for _, sources, _, transposed, _ in entries if transposed for source in sources}
        return {initializer: torch.int8 for initializer, _, _, transposed, _ in entries if transposed}

    def stream(self, tensors: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        for name, tensor in tensors:
            if name in self.quantized:
                tensor, self.scales[name] = quantize_per_output_channel(tensor)
            yield name, tensor

    def places(self, slot: WeightSlot) -> bool:
        return slot.dtype == torch.int8

    def place(self, graph: ir.Graph, slot: WeightSlot, external: ir.ExternalTensor) -> None:
        name = slot.initializer
        value = graph.initializers.pop(name)
        float_type = value.type
        q = ir.Value(name=f"{name}_quantized", shape=ir.Shape(slot.shape), type=ir.TensorType(ir.DataType.INT8))
        external.name = q.name
        q.const_value = external
        graph.register_initializer(q)
        scale = np.concatenate([self.scales.pop(source) for source in slot.sources])
        s = add_initializer(graph, f"{name}_scale", scale)
        zero = add_initializer(graph, f"{name}_zero_point", np.zeros(scale.shape, dtype=np.int8))
        dq = ir.node("DequantizeLinear", [q, s, zero], {"axis": 1})
        dq.outputs[0].name = f"{name}_DequantizeLinear_Output"
        dq.outputs[0].shape, dq.outputs[0].type = value.shape, float_type
        matmul = value.uses()[0].node
        graph.insert_before(matmul, dq)
        value.replace_all_uses_with(dq.outputs[0])
        if self.activation_max is not None:
            absmax = max(self.activation_max[source.removesuffix(".weight")] for source in slot.sources)
            _quantize_activation(graph, matmul, symmetric_scales(np.array(absmax, dtype=np.float32)), name)


def _quantize_activation(graph: ir.Graph, matmul: ir.Node, scale: np.ndarray, name: str) -> None:
    x = matmul.inputs[0]
    s = add_initializer(graph, f"{name}_input_scale", scale)
    zero = add_initializer(graph, f"{name}_input_zero_point", np.zeros((), dtype=np.int8))
    q = ir.node("QuantizeLinear", [x, s, zero])
    dq = ir.node("DequantizeLinear", [q.outputs[0], s, zero])
    q.outputs[0].name, dq.outputs[0].name = (
        f"{name}_input_QuantizeLinear_Output",
        f"{name}_input_DequantizeLinear_Output",
    )
    q.outputs[0].shape, q.outputs[0].type = x.shape, ir.TensorType(ir.DataType.INT8)
    dq.outputs[0].shape, dq.outputs[0].type = x.shape, x.type
    graph.insert_before(matmul, [q, dq])
    matmul.replace_input_with(0, dq.outputs[0])
