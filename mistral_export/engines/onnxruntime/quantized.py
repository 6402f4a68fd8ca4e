"""The ONNX Runtime artifact of the INT8 precisions: the fastest form ONNX Runtime's CPU provider runs.

The portable model.onnx of int8 / int8-wo is fp16 with standard Q/DQ (what TensorRT reads). ONNX Runtime's
CPU provider has no fp16 GEMM on x86 (it wraps fp16 nodes in casts) and its fastest 8-bit GEMM is the
contrib op `com.microsoft.MatMulNBits` (bits 8, accuracy_level 4: int8 weights, activations quantized to
int8 per block on the fly, int8 dot products). It beats both the Q/DQ graph ORT fuses itself and fp32 by
far (DESIGN.md, "Quantization facts"; step times in benchmarks/results/decode_cpu.md); at its default
accuracy level it is ten times slower than fp32, so the level is always set. The block (one activation scale
per block; our 8-bit weights have one scale per output channel whatever the block) is the largest power of two
dividing K, at most 128. With the weights streamed from memory, as every decode step streams them, blocks of
128 made the ~175M config's whole int8 step 0.86-0.92x of its time with blocks of 512 (2 threads, interleaved
runs, benchmarks/results/profile_decode_cpu.md: its GEMMs went from ~28 to ~44 GB/s); 256 was as slow as 512,
64 and 32 slower than 128. A weight small enough to stay in the CPU's last-level cache (a microbenchmark's lone GEMM)
shows no such difference, hence the earlier choice of 512.

So the artifact is made in two steps around `optimize_for_runtime`:
- before: activations, caches and logits become fp32 (fp16 initializers converted, casts retargeted; the
  embedding table stays fp16, its gathered rows cast);
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

from mistral_export.engines.onnxruntime.fusions import MS_DOMAIN
from mistral_export.export.precision import PRECISION_KEY
from mistral_export.export.precision.onnx_weights import add_initializer

QUANTIZED = ("int8", "int8-wo", "int4-awq", "fp8")  # fp8 keeps its Q/DQ pairs (fp32 around them)
MAX_BLOCK_SIZE = 128


def block_size(k: int) -> int:
    """MatMulNBits' block for a reduction of K: the largest power of two dividing K, within 16..128 (no padding
    unless K is not a multiple of 16)."""
    return max(16, min(MAX_BLOCK_SIZE, k & -k))


ACCURACY_LEVEL = 4  # int8 compute; the default (0) is ten times slower than fp32 on CPU


def is_quantized(model: ir.Model) -> bool:
    return model.metadata_props.get(PRECISION_KEY) in QUANTIZED


def to_float32_activations(model: ir.Model) -> None:
    """Every fp16 tensor of the main graph becomes fp32 (function bodies are generic in their input type), but a
    table only gathered from (the embedding): it stays fp16, its gathered rows cast to fp32, the same values at
    half the bytes (a Mistral 7B embedding in fp32 would be 0.5 GB of the artifact's memory)."""
    graph = model.graph
    f16, f32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
    tables = {
        name
        for name, value in graph.initializers.items()
        if value.dtype == f16
        and value.uses()
        and all(use.node.op_type == "Gather" and use.node.domain == "" and use.idx == 0 for use in value.uses())
    }
    gathers = [use.node for name in tables for use in graph.initializers[name].uses()]
    for name, value in list(graph.initializers.items()):
        if value.dtype == f16 and value.const_value is not None and name not in tables:
            value.const_value = _lazy(
                lambda source=value.const_value: _released(source, source.numpy().astype(np.float32)),
                f32,
                value.const_value.shape,
                name,
            )
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
    for gather in gathers:
        rows = gather.outputs[0]
        cast = ir.node("Cast", [rows], {"to": int(f32)})
        cast.outputs[0].name, cast.outputs[0].shape, cast.outputs[0].type = f"{rows.name}_float", rows.shape, rows.type
        rows.replace_all_uses_with(cast.outputs[0], replace_graph_outputs=True)
        cast.replace_input_with(0, rows)  # replace_all_uses_with moved the cast's own input too
        rows.type = ir.TensorType(f16)
        graph.insert_after(gather, cast)


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _quantized_weight(dq: ir.Node | None):
    """(weight [K, N], not read yet; scales [blocks, N] fp32; rows per block; bits) of a DequantizeLinear of an int8
    initializer with one scale per output channel or of an INT4 initializer with blocks along K; None for anything
    else."""
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "":
        return None
    weight = dq.inputs[0].const_value
    scale = _constant(dq.inputs[1])
    zero = _constant(dq.inputs[2]) if len(dq.inputs) > 2 else None
    if weight is None or scale is None or len(weight.shape) != 2 or (zero is not None and np.any(zero != 0)):
        return None
    k, n = weight.shape
    axis, block = dq.attributes.get_int("axis", 1), dq.attributes.get_int("block_size", 0)
    if weight.dtype == ir.DataType.INT8 and axis in (1, -1) and scale.shape == (n,):
        return weight, scale.astype(np.float32)[None, :], k, 8
    if weight.dtype == ir.DataType.INT4 and axis == 0 and block and scale.shape == (k // block, n) and k % block == 0:
        return weight, scale.astype(np.float32), block, 4
    return None


def _signed_values(weight: ir.TensorProtocol) -> np.ndarray:
    values = weight.numpy()
    return values if values.dtype == np.int8 else values.astype(np.int8)  # INT4 arrives as ml_dtypes.int4


def _lazy(make, dtype: ir.DataType, shape, name: str) -> ir.LazyTensor:
    """A tensor computed when it is written (one at a time), its source's mapping released after: the artifact is
    written without any weight of the model held in memory."""

    def evaluate():
        return ir.tensor(make(), name=name)

    return ir.LazyTensor(evaluate, dtype, ir.Shape(list(shape)), name=name)


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
    """MatMul(x, DequantizeLinear(W)) → MatMulNBits over the same values and scales (int8 per output channel: 8 bits;
    INT4 blocks along K: 4 bits, the same blocks). Returns the count."""
    graph = model.graph
    converted = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain != "":
            continue
        found = _quantized_weight(node.inputs[1].producer())
        if found is None:
            continue
        weight, scale, scale_rows, bits = found
        k, n = weight.shape
        # 8 bits: one scale per output channel, so any block (the largest fitting K: faster at decode) repeats it;
        # 4 bits: the weights' own blocks.
        block = block_size(k) if bits == 8 else scale_rows
        blocks = -(-k // block)
        name = node.inputs[1].producer().inputs[0].name or f"matmul{converted}"
        packed_shape = (n, blocks, block * bits // 8)
        b = ir.Value(name=f"{name}.nbits", shape=ir.Shape(list(packed_shape)), type=ir.TensorType(ir.DataType.UINT8))
        b.const_value = _lazy(
            lambda weight=weight, block=block, bits=bits: _released(
                weight, pack_nbits(_signed_values(weight), block, bits)
            ),
            ir.DataType.UINT8,
            packed_shape,
            b.name,
        )
        graph.register_initializer(b)
        per_block = np.repeat(scale, blocks, axis=0) if bits == 8 else scale  # [blocks, N]
        s = add_initializer(graph, f"{name}.nbits_scales", np.ascontiguousarray(per_block.T).reshape(-1))
        matmul = ir.node(
            "MatMulNBits",
            [_activation_source(node.inputs[0]), b, s],
            {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": ACCURACY_LEVEL},
            domain=MS_DOMAIN,
        )
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


def pack_nbits(weight: np.ndarray, block: int, bits: int) -> np.ndarray:
    """Signed values [K, N] (int8: -128..127; int4: -8..7) → MatMulNBits' B: [N, blocks, block * bits / 8] unsigned
    bytes with its default zero point (2^(bits-1)), K padded with zeros to whole blocks, 4-bit pairs low nibble first."""
    k, n = weight.shape
    blocks = -(-k // block)
    offset = 1 << (bits - 1)
    unsigned = np.full((n, blocks * block), offset, dtype=np.uint8)
    if bits == 8:  # int8 + 128 is a flip of the sign bit: no wider temporary of a large weight
        np.bitwise_xor(weight.view(np.uint8).T, np.uint8(0x80), out=unsigned[:, :k])
    else:
        unsigned[:, :k] = (weight.T.astype(np.int16) + offset).astype(np.uint8)
    unsigned = unsigned.reshape(n, blocks, block)
    if bits == 4:
        unsigned = unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)
    return unsigned


def save_with_own_data(model: ir.Model, artifact: Path) -> None:
    """ARTIFACT and ARTIFACT.data (every weight), written in a staging folder and moved in, the model last. The
    converted weights are computed one at a time as they are written (`_lazy`)."""
    from mistral_export.export.onnx_export import staged_model

    with staged_model(artifact.parent, artifact.name) as staging:
        ir.save(model, str(staging / artifact.name), external_data=artifact.name + ".data")
