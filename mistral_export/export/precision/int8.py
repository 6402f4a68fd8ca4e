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

import numpy as np
import onnx_ir as ir
import torch
from torch import Tensor

from mistral_export.export.precision.onnx_weights import INT8_MAX
from mistral_export.export.precision.quantized_weights import QuantizedWeights, quantize_activation
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


class Int8Weights(QuantizedWeights):
    """The INT8 precisions' weight transform for `export_graph`: every GEMM weight (the lm_head included) int8 as it
    streams, then DequantizeLinear in the graph; with `activation_max` (W8A8, Linear name → max |x| over
    calibration, filled while the stream runs) also the activation's Q/DQ pair."""

    def __init__(self, activation_max: dict[str, float] | None = None):
        super().__init__()
        self.activation_max = activation_max

    def describe(self) -> str:
        return "int8 GEMM weights" + (" and activation Q/DQ" if self.activation_max is not None else "")

    def storage(self, sources: tuple[str, ...]) -> torch.dtype:
        return torch.int8

    def quantize(self, weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, np.ndarray]:
        return quantize_per_output_channel(weight)

    def quantize_activation(self, graph: ir.Graph, matmul: ir.Node, slot: WeightSlot) -> None:
        if self.activation_max is None:
            return
        absmax = max(self.activation_max[source.removesuffix(".weight")] for source in slot.sources)
        scale = symmetric_scales(np.array(absmax, dtype=np.float32))
        quantize_activation(graph, matmul, scale, np.zeros((), dtype=np.int8), slot.initializer)
