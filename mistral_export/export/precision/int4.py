"""INT4 weight-only (W4A16) on the fp16 graph: 4-bit GEMM weights blockwise along K behind DequantizeLinear.

Each MatMul weight [K, N] (a Linear's [N, K], stored transposed by the exporter) becomes an INT4 initializer with
one fp16 scale per block of `block_size` rows of K and per output column, symmetric (no zero point, values -7..7,
scale = max|w| / 7 of the fp16 weight, as TensorRT's INT4 weight-only path and ModelOpt's INT4 AWQ have it: a
positive scale per block), read by DequantizeLinear(axis=0, block_size) at opset 21; activations stay fp16. A
strongly typed TensorRT engine runs it as INT4 weight-only GEMMs; ONNX Runtime's CPU provider runs it too, and the
ONNX Runtime artifact turns each into MatMulNBits over the same values and scales.

The output projection (lm_head) is in 4 bits too, as onnxruntime-genai's int4 export has it: with Mistral 7B's
shapes it is 2% of the GEMM weights, but a quarter of the ~175M benchmark config's, where at 8 bits it held the
decode step to 0.97x genai int4's (0.90x with 4 bits). It costs 3 points of top-1 on the fixture, within the bar;
the measured numbers, the 8-bit lm_head beside them, are in the README's precision table. The embedding (one row
read per token, never streamed whole) and the norms stay fp16, as in AutoAWQ, ModelOpt and onnxruntime-genai.

Weights are quantized as they stream into model.onnx.data (quantized_weights.py): no fp16 copy of the model.
ONNX Runtime's `quantize_qdq_matmul_4bits` (what `matmul_nbits_quantizer` packs with) scales each block by its
*signed* largest value / -8, so half the scales are negative: TensorRT's DequantizeLinear contract wants positive
scales, hence this small quantizer of our own. `round_to_grid_` is the same rounding in fp32, for the AWQ search.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mistral_export.errors import MistralExportError
from mistral_export.export.precision.int8 import BLOCK_ELEMENTS
from mistral_export.export.precision.quantized_weights import QuantizedWeights
from mistral_export.export.weight_streaming import WeightSlot
from mistral_export.model.config import ModelConfig

BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 128
INT4_MAX = 7
OPSET = 21  # DequantizeLinear's block_size and the INT4 type


def check_block_size(block_size: int, config: ModelConfig | None = None) -> None:
    """A block size of BLOCK_SIZES that divides every GEMM's reduction (K) of CONFIG."""
    if block_size not in BLOCK_SIZES:
        raise MistralExportError(
            f"--int4-block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size}"
        )
    if config is None:
        return
    reductions = {config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim}
    if any(k % block_size for k in reductions):
        fitting = [b for b in BLOCK_SIZES if not any(k % b for k in reductions)]
        raise MistralExportError(
            f"--int4-block-size {block_size} does not divide the model's GEMM reductions {sorted(reductions)}; "
            + (f"choose one of {', '.join(map(str, fitting))}" if fitting else "no int4 block size fits this model")
        )


def round_to_grid_(weight: Tensor, block_size: int) -> Tensor:
    """An fp32 Linear weight [N, K] the caller owns, rounded in place as the export rounds it (`quantize_blocks`),
    kept in fp32: what the AWQ search measures (no int8 round trip and no |w| copy: it rounds every weight twenty
    times)."""
    n, k = weight.shape
    blocks = weight.view(n, k // block_size, block_size)
    scale = block_scales(blocks).float().unsqueeze(-1)
    blocks.div_(scale).round_().clamp_(-INT4_MAX, INT4_MAX).mul_(scale)
    return weight


def block_scales(blocks: Tensor) -> Tensor:
    """fp16 scale of each block (the last axis): max|w| / 7 computed in fp32 (without an |w| copy); 1 for an all-zero
    block."""
    scale = (torch.maximum(blocks.amax(-1), blocks.amin(-1).neg_()).float() / INT4_MAX).half()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_blocks(weight: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """WEIGHT [N, K] → (int8 values in -7..7 [N, K / block_size, block_size], fp16 scales [N, K / block_size]):
    scale max|w| / 7 per block (in fp32, stored fp16; an all-zero block gets 1), values w / scale rounded half to
    even."""
    n, k = weight.shape
    blocks = weight.float().reshape(n, k // block_size, block_size)
    scale = block_scales(blocks)
    values = blocks.div(scale.float().unsqueeze(-1)).round_().clamp_(-INT4_MAX, INT4_MAX).to(torch.int8)
    return values, scale


def pack_int4(values: Tensor) -> Tensor:
    """int8 values [N, K] in -8..7 → [N/2, K] uint8: ONNX's INT4 packing of the transposed [K, N] tensor (two
    neighbours along N a byte, the first in the low nibble)."""
    nibbles = values.view(torch.uint8) & 0x0F
    return nibbles[0::2] | (nibbles[1::2] << 4)


class Int4Weights(QuantizedWeights):
    """int4-awq's weight transform for `export_graph`: INT4 blocks along K for every GEMM."""

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE):
        super().__init__()
        self.block_size = block_size

    def describe(self) -> str:
        return f"int4 GEMM weights in blocks of {self.block_size}"

    def storage(self, sources: tuple[str, ...]) -> torch.dtype:
        return torch.int4

    def quantize(self, weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, np.ndarray]:
        n, k = weight.shape
        packed = torch.empty((n // 2, k), dtype=torch.uint8)
        scales = torch.empty((n, k // self.block_size), dtype=torch.float16)
        step = max(2, BLOCK_ELEMENTS // k // 2 * 2)  # an even count of rows: whole bytes of packed pairs
        for start in range(0, n, step):
            # Quantized from the fp16 value the graph would hold (the trace dtype), as the INT8 weights are.
            rows = weight[start : start + step].detach().to("cpu", torch.float16)
            values, scales[start : start + step] = quantize_blocks(rows, self.block_size)
            packed[start // 2 : (start + step) // 2] = pack_int4(values.reshape(rows.shape))
        return packed, scales.T.contiguous().numpy()  # scales [K / block_size, N]

    def dequantize_attributes(self, slot: WeightSlot) -> dict:
        return {"axis": 0, "block_size": self.block_size}
