"""An ONNX graph's inputs and outputs as the engine description records them (artifacts/description.py)."""

from __future__ import annotations

from pathlib import Path

import onnx

from mistral_export.artifacts.description import GraphIO, TensorSpec


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
    return TensorSpec(value.name, dtype, shape)


def graph_io(model_path: Path) -> GraphIO:
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return GraphIO(tuple(map(_spec, graph.input)), tuple(map(_spec, graph.output)))
