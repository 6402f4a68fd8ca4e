"""FP8 (E4M3) on the fp16 graph: Q/DQ pairs on every GEMM's activation and weight, as TensorRT fuses them on Ada/Hopper.

- Weights: float8e4m3fn, one scale per output channel (max |w| / 448), behind DequantizeLinear(axis=1).
- Activations: QuantizeLinear → DequantizeLinear with one static scale per tensor, max |x| / 448 over the
  calibration steps (ONNX Runtime's MinMax calibrator on the fp16 graph: the ranges of the tensors the graph
  really multiplies).
- Scales fp16, zero points float8e4m3fn 0; everything else stays fp16, the output projection (lm_head) included,
  as ModelOpt's FP8 recipe leaves it: E4M3's 3 mantissa bits there cost the most top-1 agreement of any GEMM
  (tiny: 96.7% with it in FP8, under the 97% bar; the README's precision table has the numbers).

ONNX Runtime's `quantize_static` does FP8 too, but only with its Gaussian "Distribution" calibration (a scale from
each tensor's standard deviation, not its range) and per-tensor weights, neither what TensorRT's FP8 recipe
(ModelOpt: amax / 448 per tensor, weights per channel) is, hence this small pass. ONNX Runtime's CPU provider
runs the result (slowly: it dequantizes to fp32 every step), which is how it is validated here.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir

from mistral_export.export.precision.calibration import Step
from mistral_export.export.precision.int4 import LM_HEAD
from mistral_export.export.precision.onnx_weights import add_initializer, behind_dequantize, matmul_weights

E4M3_MAX = 448.0


def _scale(amax: np.ndarray, dtype) -> np.ndarray:
    scale = (np.asarray(amax, dtype=np.float32) / E4M3_MAX).astype(dtype)
    return np.where(scale > 0, scale, np.ones_like(scale))


def to_e4m3(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """VALUES / SCALE rounded to E4M3 (saturated at ±448, as QuantizeLinear's default)."""
    scaled = np.clip(values.astype(np.float32) / scale.astype(np.float32), -E4M3_MAX, E4M3_MAX)
    return scaled.astype(ml_dtypes.float8_e4m3fn)


def activation_ranges(source: Path, steps: Iterator[Step], inputs: set[str]) -> dict[str, float]:
    """max |x| of each tensor in INPUTS over the calibration steps (ONNX Runtime's MinMax calibrator)."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    with tempfile.TemporaryDirectory(dir=source.parent) as scratch, quiet_root_logger():
        calibrator = create_calibrator(
            str(source),
            ["MatMul"],
            str(Path(scratch) / "augmented.onnx"),
            CalibrationMethod.MinMax,
            use_external_data_format=True,
        )
        calibrator.collect_data(calibration_feeds(steps))
        ranges = calibrator.compute_data()
        del calibrator  # its session holds the augmented model's files
    return {name: float(np.abs(np.asarray(ranges[name].range_value, dtype=np.float32)).max()) for name in inputs}


def quantize_fp8(source: Path, target: Path, steps: Iterator[Step]) -> None:
    """SOURCE (fp16 model.onnx) → TARGET with E4M3 Q/DQ on every MatMul's activation and weight."""
    model = ir.load(str(source))
    found = [(node, weight) for node, weight in matmul_weights(model) if not weight.name.startswith(LM_HEAD)]
    ranges = activation_ranges(source, steps, {node.inputs[0].name for node, _ in found})
    graph = model.graph
    zero = add_initializer(graph, "fp8_zero_point", np.zeros((), dtype=ml_dtypes.float8_e4m3fn))
    dequantized: dict[str, ir.Value] = {}  # one Q/DQ pair per activation, whatever number of MatMuls read it
    for node, weight in found:
        values = weight.const_value.numpy()
        dtype = values.dtype
        scale = _scale(np.abs(values.astype(np.float32)).max(axis=0), dtype)
        behind_dequantize(graph, node, weight, to_e4m3(values, scale), scale)

        x = node.inputs[0]
        if x.name not in dequantized:
            x_scale = add_initializer(graph, f"{x.name}_scale", _scale(np.array(ranges[x.name]), dtype))
            q = ir.node("QuantizeLinear", [x, x_scale, zero])
            q.outputs[0].name = f"{x.name}_QuantizeLinear_Output"
            q.outputs[0].shape, q.outputs[0].type = x.shape, ir.TensorType(ir.DataType.FLOAT8E4M3FN)
            dq = ir.node("DequantizeLinear", [q.outputs[0], x_scale, zero])
            dq.outputs[0].name = f"{x.name}_DequantizeLinear_Output"
            dq.outputs[0].shape, dq.outputs[0].type = x.shape, x.type
            graph.insert_before(node, [q, dq])
            dequantized[x.name] = dq.outputs[0]
        node.replace_input_with(0, dequantized[x.name])
    ir.save(model, str(target), external_data=target.name + ".data")


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
