"""INT4 weight-only (W4A16) on the fp16 graph: 4-bit GEMM weights blockwise along K behind DequantizeLinear.

Each MatMul weight [K, N] (stored transposed by the exporter) becomes an INT4 initializer with one fp16 scale per
block of `block_size` rows of K and per output column, symmetric (zero point 0, values -7..7, scale = max|w| / 7,
as TensorRT's INT4 weight-only path and ModelOpt's INT4 AWQ have it: a positive scale per block), read by
DequantizeLinear(axis=0, block_size) at opset 21; activations stay fp16. A strongly typed TensorRT engine runs it
as INT4 weight-only GEMMs; ONNX Runtime's CPU provider fuses the pair into MatMulNBits.

The output projection (lm_head) is kept at 8 bits (int8, one scale per output channel, as int8-wo): AutoAWQ and
llm-awq keep it fp16 because 4 bits there costs the most quality of any layer; 8 bits costs almost none at half
the bytes (the measured numbers are in the README's precision table). The embedding and the norms stay fp16.

ONNX Runtime's `quantize_qdq_matmul_4bits` (what `matmul_nbits_quantizer` packs with) scales each block by its
*signed* largest value / -8, so half the scales are negative: TensorRT's DequantizeLinear contract wants positive
scales, hence this small packer of our own. `fake_quantize` is the same rounding in torch, for the AWQ search.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from mistral_export.errors import MistralExportError
from mistral_export.export.precision.onnx_weights import add_initializer, dequantize_int8, matmul_weights

BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 128
INT4_MAX = 7
OPSET = 21  # DequantizeLinear's block_size and the INT4 type
LM_HEAD = "output."  # the output projection's weight name prefix (kept at 8 bits)


def check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise MistralExportError(
            f"--int4-block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size}"
        )


def block_scales(blocks: np.ndarray) -> np.ndarray:
    """fp16 scale of each block (axis 1 of [K/B, B, N]): max |w| / 7; an all-zero block gets 1."""
    scale = (np.abs(blocks).max(axis=1) / INT4_MAX).astype(np.float16)
    return np.where(scale > 0, scale, np.float16(1.0))


def quantize_blockwise(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float → (int8 values in -7..7 [K, N], fp16 scales [K / block_size, N])."""
    k, n = weight.shape
    blocks = weight.astype(np.float32).reshape(k // block_size, block_size, n)
    scale = block_scales(blocks)
    values = np.clip(np.rint(blocks / scale.astype(np.float32)[:, None, :]), -INT4_MAX, INT4_MAX)
    return values.astype(np.int8).reshape(k, n), scale


def fake_quantize(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """A Linear weight [N, K] rounded as the export rounds it (blocks along K, fp16 scales), in fp32."""
    n, k = weight.shape
    blocks = weight.float().reshape(n, k // block_size, block_size)
    scale = (blocks.abs().amax(-1, keepdim=True) / INT4_MAX).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.clamp(torch.round(blocks / scale), -INT4_MAX, INT4_MAX) * scale).reshape(n, k)


def quantize_int4_weights(source: Path, target: Path, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """SOURCE (fp16 model.onnx, opset 21) → TARGET: INT4 block-quantized GEMM weights, the lm_head int8."""
    check_block_size(block_size)
    model = ir.load(str(source))
    for node, weight in matmul_weights(model):
        name = weight.name
        values = weight.const_value.numpy()
        if name.startswith(LM_HEAD):
            dequantize_int8(model.graph, node, weight, values)
            continue
        if values.shape[0] % block_size:
            raise MistralExportError(
                f"{name}: K = {values.shape[0]} is not a multiple of --int4-block-size "
                f"{block_size}; choose one of {', '.join(map(str, BLOCK_SIZES))} dividing it"
            )
        quantized, scale = quantize_blockwise(values, block_size)
        q = add_initializer(model.graph, f"{name}_quantized", quantized.astype(ml_dtypes.int4))
        s = add_initializer(model.graph, f"{name}_scale", scale.astype(values.dtype))
        dq = ir.node("DequantizeLinear", [q, s], {"axis": 0, "block_size": block_size})
        dq.outputs[0].name = f"{name}_DequantizeLinear_Output"
        dq.outputs[0].shape, dq.outputs[0].type = weight.shape, weight.type
        model.graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        if not weight.uses():
            model.graph.initializers.pop(name)
    ir.save(model, str(target), external_data=target.name + ".data")
