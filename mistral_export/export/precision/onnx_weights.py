"""Weights in an ONNX graph (onnx_ir): the GEMM weights of a traced graph, an initializer added, an int8 weight
behind DequantizeLinear. Shared by the precisions quantized after tracing (int4-awq, fp8), the streamed INT8 writer
and the ONNX Runtime artifact passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

INT8_MAX = 127


def matmul_weights(model: ir.Model) -> list[tuple[ir.Node, ir.Value]]:
    """(MatMul, weight) for every MatMul of the main graph whose second input is a weight initializer."""
    found = []
    for node in model.graph:
        if node.op_type == "MatMul" and node.domain == "":
            weight = node.inputs[1]
            if (
                weight is not None
                and weight.is_initializer()
                and weight.dtype in (ir.DataType.FLOAT16, ir.DataType.FLOAT)
            ):
                found.append((node, weight))
    return found


def dequantize_int8(graph: ir.Graph, node: ir.Node, weight: ir.Value, values: np.ndarray) -> None:
    """NODE's weight input (VALUES [K, N]) → DequantizeLinear(int8, one scale per output channel, in its dtype)."""
    scale = np.abs(values.astype(np.float32)).max(axis=0) / INT8_MAX
    scale = np.where(scale > 0, scale, 1.0).astype(weight.dtype.numpy())
    quantized = np.clip(np.rint(values.astype(np.float32) / scale.astype(np.float32)), -INT8_MAX, INT8_MAX)
    behind_dequantize(graph, node, weight, quantized.astype(np.int8), scale)


def behind_dequantize(
    graph: ir.Graph, node: ir.Node, weight: ir.Value, quantized: np.ndarray, scale: np.ndarray
) -> None:
    """NODE's weight input becomes DequantizeLinear(QUANTIZED, SCALE per output channel, zero points of QUANTIZED's
    type); the float weight goes when nothing else reads it."""
    name = weight.name
    q = add_initializer(graph, f"{name}_quantized", quantized)
    s = add_initializer(graph, f"{name}_scale", scale)
    zero = add_initializer(graph, f"{name}_zero_point", np.zeros(scale.shape, dtype=quantized.dtype))
    dq = ir.node("DequantizeLinear", [q, s, zero], {"axis": 1})
    dq.outputs[0].name = f"{name}_DequantizeLinear_Output"
    dq.outputs[0].shape, dq.outputs[0].type = weight.shape, weight.type
    graph.insert_before(node, dq)
    node.replace_input_with(1, dq.outputs[0])
    if not weight.uses():
        graph.initializers.pop(name)


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    value.const_value = ir.tensor(array, name=name)
    graph.register_initializer(value)
    return value
