"""The ONNX Runtime artifact of the INT8 precisions: the fastest form ONNX Runtime's CPU provider runs.

The portable model.onnx of int8 / int8-wo is fp16 with standard Q/DQ (what TensorRT reads). ONNX Runtime's
CPU provider has no fp16 GEMM on x86 (it wraps fp16 nodes in casts) and its fastest 8-bit GEMM is the
contrib op `com.microsoft.MatMulNBits` (bits 8, accuracy_level 4: int8 weights, activations quantized to
int8 per block on the fly, int8 dot products). Measured on the ~175M config (benchmarks/decode_cpu.py):
MatMulNBits beats both the Q/DQ graph ORT fuses itself and fp32 by far; at its default accuracy level it
is ten times slower than fp32, so the level is always set. Larger blocks are a little faster at decode
(one activation scale per block; our weights have one scale per output channel whatever the block):
MatMulNBits' time per step was 10.75 ms with blocks of 32, 8.84 with 128, 8.60 with 512 and 8.59 with
1024 (ORT profiler, int8-wo, ~175M config, the four interleaved on a busy machine), so a block is the
largest power of two dividing K, at most 512.

So the artifact is made in two steps around `optimize_for_runtime`:
- before: activations, caches and logits become fp32 (fp16 initializers converted, casts retargeted);
- after: each MatMul whose weight is DequantizeLinear(int8, one scale per output channel) becomes
  MatMulNBits over the *same* int8 values and scales (no requantization: its results are those of the
  portable model's weights); a W8A8 activation Q/DQ pair before it is dropped (MatMulNBits quantizes
  the activation itself). No library converts existing Q/DQ weights to MatMulNBits' layout, hence this.

The artifact then carries its own weights file, model.ort.onnx.data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from mistral_export.engines.onnxruntime_fusions import MS_DOMAIN
from mistral_export.export.precision import PRECISION_KEY
from mistral_export.export.precision.int8 import add_initializer

QUANTIZED = ("int8", "int8-wo")
MAX_BLOCK_SIZE = 512


def block_size(k: int) -> int:
    """MatMulNBits' block for a reduction of K: the largest power of two dividing K, within 16..512 (no padding
    unless K is not a multiple of 16)."""
    return max(16, min(MAX_BLOCK_SIZE, k & -k))
ACCURACY_LEVEL = 4  # int8 compute; the default (0) is ten times slower than fp32 on CPU


def is_quantized(model: ir.Model) -> bool:
    return model.metadata_props.get(PRECISION_KEY) in QUANTIZED


def to_float32_activations(model: ir.Model) -> None:
    """Every fp16 tensor of the main graph becomes fp32 (function bodies are generic in their input type)."""
    graph = model.graph
    f16, f32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
    for name, value in list(graph.initializers.items()):
        if value.dtype == f16 and value.const_value is not None:
            value.const_value = _lazy(lambda source=value.const_value: _released(source, source.numpy().astype(
                np.float32)), f32, value.const_value.shape, name)
            value.type = ir.TensorType(f32)
    values = [*graph.inputs, *graph.outputs, *(out for node in graph for out in node.outputs)]
    for value in values:
        if value.dtype == f16:
            value.type = ir.TensorType(f32)
    for node in graph:
        if node.domain != "":
            continue
        if node.op_type == "Cast" and node.attributes.get_int("to") == f16:
            node.attributes["to"] = ir.AttrInt64("to", f32)
        elif node.op_type == "Constant" and "value" in node.attributes:
            tensor = node.attributes["value"].as_tensor()
            if tensor.dtype == f16:
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(tensor.numpy().astype(np.float32)))


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _int8_weight(dq: ir.Node | None):
    """(int8 [K, N] tensor, not read yet; scales [N]) of a DequantizeLinear of an int8 initializer with one scale per
    output channel."""
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "":
        return None
    weight = dq.inputs[0].const_value
    scale = _constant(dq.inputs[1])
    zero = _constant(dq.inputs[2]) if len(dq.inputs) > 2 else None
    if weight is None or scale is None or weight.dtype != ir.DataType.INT8 or len(weight.shape) != 2:
        return None
    if dq.attributes.get_int("axis", 1) not in (1, -1) or scale.shape != (weight.shape[1],):
        return None
    if zero is not None and np.any(zero != 0):
        return None
    return weight, scale.astype(np.float32)


def _lazy(make, dtype: ir.DataType, shape, name: str) -> ir.LazyTensor:
    """A tensor computed when it is written (one at a time), its source's mapping released after: the artifact is
    written without any weight of the model held in memory."""
    def evaluate():
        return ir.tensor(make(), name=name)
    return ir.LazyTensor(evaluate, dtype, ir.Shape(list(shape)), name=name)


def _nbits_layout(weight: ir.TensorProtocol, k: int, n: int, block: int) -> np.ndarray:
    """MatMulNBits' 8-bit layout of int8 [K, N]: [N, blocks, block_size] unsigned bytes with zero point 128 (its
    default when no zero point is given); K padded with zeros (128) to whole blocks."""
    blocks = -(-k // block)
    packed = np.full((n, blocks * block), 128, dtype=np.uint8)
    np.bitwise_xor(weight.numpy().view(np.uint8).T, np.uint8(0x80), out=packed[:, :k])  # int8 + 128, no temporary
    return _released(weight, packed.reshape(n, blocks, block))


def _released(source: ir.TensorProtocol, result: np.ndarray) -> np.ndarray:
    """RESULT, once SOURCE's file mapping is let go (each mapped weight would otherwise stay resident)."""
    if isinstance(source, ir.ExternalTensor):
        source.release()
    return result


def _activation_source(value: ir.Value) -> ir.Value:
    """x for a value DequantizeLinear(QuantizeLinear(x)) (W8A8's activation pair), else the value itself."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "":
        return value
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear" or q.domain != "":
        return value
    return q.inputs[0]


def to_matmul_nbits(model: ir.Model) -> int:
    """MatMul(x, DequantizeLinear(int8 W, per-channel scale)) → MatMulNBits(x, W + 128, scale). Returns count."""
    graph = model.graph
    converted = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain != "":
            continue
        found = _int8_weight(node.inputs[1].producer())
        if found is None:
            continue
        weight, scale = found
        k, n = weight.shape
        block = block_size(k)
        blocks = -(-k // block)
        name = node.inputs[1].producer().inputs[0].name or f"matmul{converted}"
        b = ir.Value(name=f"{name}.nbits", shape=ir.Shape([n, blocks, block]), type=ir.TensorType(ir.DataType.UINT8))
        b.const_value = _lazy(lambda weight=weight, k=k, n=n, block=block: _nbits_layout(weight, k, n, block),
                              ir.DataType.UINT8, (n, blocks, block), b.name)
        graph.register_initializer(b)
        s = add_initializer(graph, f"{name}.nbits_scales", np.repeat(scale, blocks))
        matmul = ir.node("MatMulNBits", [_activation_source(node.inputs[0]), b, s],
                         {"K": k, "N": n, "bits": 8, "block_size": block, "accuracy_level": ACCURACY_LEVEL},
                         domain=MS_DOMAIN)
        graph.insert_before(node, matmul)
        out = node.outputs[0]
        matmul.outputs[0].shape, matmul.outputs[0].type = out.shape, out.type
        out.replace_all_uses_with(matmul.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        matmul.outputs[0].name = out.name  # keeps a graph output's name (logits)
        converted += 1
    if converted:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return converted


def save_with_own_data(model: ir.Model, artifact: Path) -> None:
    """ARTIFACT and ARTIFACT.data (every weight), written in a staging folder and moved in, the model last. The
    converted weights are computed one at a time as they are written (`_lazy`)."""
    from mistral_export.export.onnx_export import staged_model

    with staged_model(artifact.parent, artifact.name) as staging:
        ir.save(model, str(staging / artifact.name), external_data=artifact.name + ".data")
