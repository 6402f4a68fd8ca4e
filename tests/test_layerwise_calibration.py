"""Layer-by-layer calibration (bounded memory) against whole-model calibration on `tiny`: the same SmoothQuant
factors and activation ranges, and an int8 model.onnx equal to the one ONNX Runtime's quantize_static made from the
whole smoothed model (the pipeline before layer-by-layer calibration)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from calibration_reference import whole_model_maxima, whole_model_steps

from mistral_export.engines.onnxruntime.artifact import write_onnxruntime_artifact
from mistral_export.errors import MistralExportError
from mistral_export.export.onnx_export import export_onnx
from mistral_export.export.precision import CalibrationOptions, calibration_options, export_precision
from mistral_export.export.precision.calibration import calibration_samples
from mistral_export.export.precision.layerwise import ChannelMaxima, LayerByLayer
from mistral_export.export.precision.smoothquant import smooth_block
from mistral_export.export.precision.w8a8 import W8A8Statistics, smoothquant_tensors
from mistral_export.model.checkpoint import load_model
from mistral_export.model.config import TINY_DIR
from mistral_export.model.tokenizer import load_tokenizer
from mistral_export.runners.base import prefill
from mistral_export.runners.onnxruntime import OnnxRuntimeRunner

from conftest import needs_tiny, small_config

ALPHA = 0.5
CALIBRATION = CalibrationOptions(samples=4, seq_len=160, tokenizer=TINY_DIR)  # 3 prefill chunks of W=64, 8 decodes


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def samples():
    return calibration_samples(CALIBRATION, load_tokenizer(TINY_DIR))


@pytest.fixture(scope="module")
def whole_model(tiny, samples):
    """Whole-model SmoothQuant: factors from the model's maxima, the smoothed model, its activations' maxima."""
    maxima = whole_model_maxima(tiny, samples)
    smoothed = copy.deepcopy(tiny)
    factors = {}
    for i, block in enumerate(smoothed.layers):
        prefix = f"layers.{i}."
        layer_maxima = {k.removeprefix(prefix): v for k, v in maxima.items() if k.startswith(prefix)}
        factors.update({prefix + k: v for k, v in smooth_block(block, layer_maxima, ALPHA, tiny.config).items()})
    activation_max = {name: float(m.max()) for name, m in whole_model_maxima(smoothed, samples).items()}
    return factors, smoothed, activation_max


@needs_tiny
def test_layer_by_layer_statistics_equal_whole_model_ones(tiny, samples, whole_model):
    factors, _, activation_max = whole_model
    statistics = W8A8Statistics()
    params = dict(tiny.named_parameters())
    stream = smoothquant_tensors(lambda name: params[name].detach().clone(), tiny.config, samples, ALPHA, statistics)
    names = [name for name, _ in stream]
    assert sorted(names) == sorted(params)  # every parameter once
    assert set(statistics.smoothing) == set(factors) and len(factors) == 4 * 7
    for name, expected in factors.items():
        torch.testing.assert_close(statistics.smoothing[name], expected, rtol=1e-5, atol=0)
    assert set(statistics.activation_max) == set(activation_max)
    for name, expected in activation_max.items():
        assert statistics.activation_max[name] == pytest.approx(expected, rel=1e-5), name
    # The statistics do change with the data: another sample set gives other factors.
    other = W8A8Statistics()
    for _ in smoothquant_tensors(lambda name: params[name].detach().clone(), tiny.config, samples[:1], ALPHA, other):
        pass
    assert not torch.allclose(other.smoothing["layers.0.attention.wq"], factors["layers.0.attention.wq"], rtol=1e-3)


def _quantize_static_whole_model(smoothed, samples, folder: Path) -> Path:
    """The pipeline before this change: the whole smoothed model traced in fp16, then ONNX Runtime's quantize_static
    with activation ranges from the calibration steps of the whole model."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    source = export_onnx(smoothed, folder / "fp16", dtype=torch.float16)
    steps = whole_model_steps(smoothed, samples)

    class Feeds(CalibrationDataReader):
        def get_next(self):
            step = next(steps, None)
            if step is None:
                return None
            ids, past_len, cache = step
            feed = {"input_ids": ids.numpy(), "past_len": past_len.numpy()}
            for i, (keys, values) in enumerate(cache):
                feed[f"past_key_values.{i}.key"] = keys.numpy().astype(np.float16)
                feed[f"past_key_values.{i}.value"] = values.numpy().astype(np.float16)
            return feed

    target = folder / "int8" / "model.onnx"
    target.parent.mkdir()
    quantize_static(
        str(source),
        str(target),
        Feeds(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=True,
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
            "OpTypesToExcludeOutputQuantization": ["MatMul"],
        },
    )
    return target


def _quantization(path: Path) -> tuple[dict, dict, dict]:
    """int8 weights and their scales by weight initializer, activation scales by the MatMul's weight."""
    model = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    weights, scales, activations = {}, {}, {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in producer:
            continue
        dq = producer[node.input[1]]
        name = dq.input[0].removesuffix("_quantized")
        weights[name], scales[name] = inits[dq.input[0]], inits[dq.input[1]]
        activation_dq = producer.get(node.input[0])
        if activation_dq is not None and activation_dq.op_type == "DequantizeLinear":
            activations[name] = inits[activation_dq.input[1]]
    return weights, scales, activations


@needs_tiny
def test_int8_model_equals_quantize_static_of_the_whole_smoothed_model(tiny, samples, whole_model, tmp_path):
    _, smoothed, _ = whole_model
    before = _quantize_static_whole_model(smoothed, samples, tmp_path / "before")
    after = export_precision(tiny, tmp_path / "after", "int8", calibration=CALIBRATION, smoothquant_alpha=ALPHA)
    weights, scales, activations = _quantization(after)
    expected_weights, expected_scales, expected_activations = _quantization(before)
    assert set(weights) == set(expected_weights) and len(weights) == 4 * 4 + 1
    for name in expected_weights:
        np.testing.assert_array_equal(weights[name], expected_weights[name], err_msg=name)  # byte-identical
        np.testing.assert_array_equal(scales[name], expected_scales[name], err_msg=name)
        assert weights[name].dtype == np.int8 and scales[name].dtype == np.float16
    # Activation scales: ORT took its ranges on the fp16 graph, this on the fp32 layers: at most one fp16 step apart
    # (measured: 7.2e-4 relative at most; fp16's step is 9.8e-4 relative).
    assert set(activations) == set(expected_activations) == set(weights)
    for name in activations:
        np.testing.assert_allclose(
            activations[name].astype(np.float32), expected_activations[name].astype(np.float32), rtol=1e-3, err_msg=name
        )
    ids = torch.tensor([samples[0][:96]])
    logits = {}
    for label, path in (("before", before), ("after", after)):
        write_onnxruntime_artifact(path)  # its artifact.json describes the folder (the runner runs model.onnx itself)
        runner = OnnxRuntimeRunner(path, portable=True)
        runner.reset(1)
        logits[label] = prefill(runner, ids, 64)
    top1 = (logits["before"].argmax(-1) == logits["after"].argmax(-1)).float().mean()
    # One activation scale an fp16 step apart moves the rounding of a whole activation tensor: logits stay close.
    assert float((logits["before"] - logits["after"]).abs().max()) < 2e-2 * float(logits["before"].abs().max())
    assert top1 >= 0.95, top1


class InputsOf:
    """A LayerHook that keeps every input of one Linear, with its rows' token indices."""

    def __init__(self, linear: str):
        self.linear, self.inputs, self.tokens = linear, [], []

    def observe(self, linear, x, tokens):
        if linear == self.linear:
            self.inputs.append(x.clone())
            self.tokens.append(tokens.clone())


@needs_tiny
def test_layer_hooks_see_every_token_once(tiny, samples):
    params = dict(tiny.named_parameters())
    layers = LayerByLayer(lambda name: params[name].detach().clone(), tiny.config, samples[:2])
    for layer in layers.layers([ChannelMaxima, lambda: InputsOf("feed_forward.w2")]):
        maxima, w2 = layer.hooks
        tokens = torch.cat([t.flatten() for t in w2.tokens])
        # Every token of every sample once (prefill chunks, then decode steps), each row told its index.
        assert sorted(tokens.tolist()) == list(range(2 * 160))
        assert [x.shape[:2] for x in w2.inputs] == [t.shape for t in w2.tokens]
        expected = torch.cat([x.flatten(0, 1) for x in w2.inputs]).abs().amax(0)
        assert torch.equal(maxima.maxima["feed_forward.w2"], expected)
    # After the last layer: the final norm's output over every token, as the whole model computes it.
    seen = []
    handle = tiny.output.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    for _ in whole_model_steps(tiny, samples[:2]):
        pass
    handle.remove()
    whole = torch.cat([torch.cat(seen[i * 11 : (i + 1) * 11], 1) for i in range(2)])  # 11 steps per sample
    torch.testing.assert_close(layers.final_norm_inputs(False), whole, rtol=1e-5, atol=1e-5)


def test_calibration_device_errors(tmp_path):
    with pytest.raises(MistralExportError, match="--calib-device must be cpu or cuda, got 'tpu'"):
        calibration_options(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MistralExportError, match="--calib-device cuda: no CUDA device"):
            LayerByLayer(lambda name: None, small_config(), [[1, 2, 3, 4]], device="cuda")
