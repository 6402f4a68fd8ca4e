"""INT8 on the fp16 graph, in the explicit Q/DQ form a strongly typed TensorRT engine reads.

- W8A8 (`quantize_w8a8`): ONNX Runtime's `quantize_static`, QDQ format, MatMul only (quantizing every
  op type quantizes the mask, the caches and RoPE), per-channel weights, symmetric INT8 with zero point
  0 for activations and weights (what TensorRT requires), activation ranges from calibration steps.
  It keeps the `mistral` function bodies and the model's metadata.
- W8A16 (`quantize_weights_only`): int8 weights, one scale per output channel, behind DequantizeLinear
  feeding the MatMul; activations stay fp16. ONNX Runtime's quantizers have no such mode (its 8-bit
  QDQ weight-only config silently leaves the model as it was), so this is a small pass of our own.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from mistral_export.export.precision.calibration import Step

log = logging.getLogger(__name__)

INT8_MAX = 127


def _matmul_weights(model: ir.Model) -> list[tuple[ir.Node, ir.Value]]:
    """(MatMul, weight) for every MatMul of the main graph whose second input is a weight initializer."""
    found = []
    for node in model.graph:
        if node.op_type == "MatMul" and node.domain == "":
            weight = node.inputs[1]
            if weight is not None and weight.is_initializer() and weight.dtype in (ir.DataType.FLOAT16,
                                                                                  ir.DataType.FLOAT):
                found.append((node, weight))
    return found


def quantize_w8a8(source: Path, target: Path, steps: Iterator[Step]) -> None:
    """SOURCE (fp16 model.onnx) → TARGET with int8 Q/DQ on every MatMul of the main graph."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with quiet_root_logger():  # it warns on the root logger to pre-process (the exporter has folded and inferred)
        quantize_static(
            str(source), str(target), calibration_feeds(steps), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
            extra_options={
                "ActivationSymmetric": True, "WeightSymmetric": True,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # one scale per output channel of [K, N]
                "OpTypesToExcludeOutputQuantization": ["MatMul"],  # Q/DQ on GEMM inputs only (TensorRT's INT8 GEMM)
            })
    data = target.with_name(target.name + ".data")
    data.chmod(0o644)  # written through a private temporary file; readable like every other artifact


def calibration_feeds(steps: Iterator[Step]):
    """The calibration steps as an ONNX Runtime CalibrationDataReader of the fp16 graph's inputs."""
    from onnxruntime.quantization import CalibrationDataReader

    class Feeds(CalibrationDataReader):
        def get_next(self):
            step = next(steps, None)
            if step is None:
                return None
            feed = {"input_ids": step.input_ids.numpy(), "past_len": step.past_len.numpy()}
            for i, (keys, values) in enumerate(step.cache):
                feed[f"past_key_values.{i}.key"] = keys.numpy().astype(np.float16)
                feed[f"past_key_values.{i}.value"] = values.numpy().astype(np.float16)
            return feed

    return Feeds()


@contextlib.contextmanager
def quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_weights_only(source: Path, target: Path) -> None:
    """SOURCE → TARGET with each MatMul weight stored int8 (per output channel) behind DequantizeLinear."""
    model = ir.load(str(source))
    for node, weight in _matmul_weights(model):
        dequantize_int8(model.graph, node, weight, weight.const_value.numpy())
    ir.save(model, str(target), external_data=target.name + ".data")


def dequantize_int8(graph: ir.Graph, node: ir.Node, weight: ir.Value, values: np.ndarray) -> None:
    """NODE's weight input (VALUES [K, N]) → DequantizeLinear(int8, one scale per output channel, in its dtype)."""
    scale = np.abs(values.astype(np.float32)).max(axis=0) / INT8_MAX
    scale = np.where(scale > 0, scale, 1.0).astype(weight.dtype.numpy())
    quantized = np.clip(np.rint(values.astype(np.float32) / scale.astype(np.float32)), -INT8_MAX, INT8_MAX)
    name = weight.name
    q = add_initializer(graph, f"{name}_quantized", quantized.astype(np.int8))
    s = add_initializer(graph, f"{name}_scale", scale)
    zero = add_initializer(graph, f"{name}_zero_point", np.zeros(scale.shape, dtype=np.int8))
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
