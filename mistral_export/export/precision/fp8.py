"""FP8 (E4M3) on the fp16 graph: Q/DQ pairs on every GEMM's activation and weight, as TensorRT fuses them on Ada/Hopper.

- Weights: float8e4m3fn, one scale per output channel (max |w| / 448 of the fp16 weight), behind
  DequantizeLinear(axis=1), quantized as they stream (quantized_weights.py).
- Activations: QuantizeLinear → DequantizeLinear with one static scale per tensor, max |x| / 448 over the
  calibration steps, measured on the fp32 layers one decoder layer at a time (layerwise.py, the statistic int8's
  W8A8 uses, without smoothing).
- Scales fp16, zero points float8e4m3fn 0; everything else stays fp16, the output projection (lm_head) included,
  as ModelOpt's FP8 recipe leaves it: E4M3's 3 mantissa bits there cost the most top-1 agreement of any GEMM
  (tiny: 96.7% with it in FP8, under the 97% bar; the README's precision table has the numbers).

ONNX Runtime's `quantize_static` does FP8 too, but only with its Gaussian "Distribution" calibration (a scale from
each tensor's standard deviation, not its range) and per-tensor weights, neither what TensorRT's FP8 recipe
(ModelOpt: amax / 448 per tensor, weights per channel) is, and it holds the whole model; hence this small writer.
ONNX Runtime's CPU provider runs the result (slowly: it dequantizes to fp32 every step), which is how it is
validated here.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
from torch import Tensor

from mistral_export.export.precision.quantized_weights import QuantizedWeights, quantize_activation
from mistral_export.export.weight_streaming import WeightSlot

LM_HEAD = "output."  # the output projection's weight name prefix (kept fp16)

E4M3_MAX = 448.0


def fp8_scale(amax: Tensor) -> Tensor:
    """fp16 scale(s) amax / 448 (computed in fp32); 1 where the range is zero."""
    scale = (amax.float() / E4M3_MAX).half()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def to_e4m3(values: Tensor, scale: Tensor) -> Tensor:
    """VALUES / SCALE rounded to E4M3 (saturated at ±448, as QuantizeLinear's default)."""
    return values.float().div(scale.float()).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


class Fp8Weights(QuantizedWeights):
    """fp8's weight transform for `export_graph`: E4M3 weights per output channel and the activations' static Q/DQ
    from `activation_max` (Linear name → max |x|, filled while the stream runs), every GEMM but the lm_head."""

    def __init__(self, activation_max: dict[str, float]):
        super().__init__()
        self.activation_max = activation_max

    def describe(self) -> str:
        return "fp8 E4M3 GEMM weights and activation Q/DQ, the lm_head fp16"

    def storage(self, sources: tuple[str, ...]) -> torch.dtype | None:
        return None if any(source.startswith(LM_HEAD) for source in sources) else torch.float8_e4m3fn

    def quantize(self, weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, np.ndarray]:
        w16 = weight.detach().to("cpu", torch.float16)  # the value the fp16 graph would hold
        scale = fp8_scale(w16.abs().amax(1))
        return to_e4m3(w16, scale.unsqueeze(1)), scale.numpy()

    def quantize_activation(self, graph: ir.Graph, matmul: ir.Node, slot: WeightSlot) -> None:
        absmax = max(self.activation_max[source.removesuffix(".weight")] for source in slot.sources)
        scale = fp8_scale(torch.tensor(absmax)).numpy()
        quantize_activation(graph, matmul, scale, np.zeros((), dtype=ml_dtypes.float8_e4m3fn), slot.initializer)
