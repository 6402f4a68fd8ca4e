"""An initializer added to an ONNX graph (onnx_ir), for the quantized weight writers and the ONNX Runtime artifact
passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

INT8_MAX = 127


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    value.const_value = ir.tensor(array, name=name)
    graph.register_initializer(value)
    return value
