"""int4-awq (W4A16, AWQ) and fp8 (E4M3): the command-line pipeline on tiny, quality bars on ONNX Runtime against the
fp32 eager model, the portable graphs' form, the MatMulNBits 4-bit artifact's weights, AWQ against round-to-nearest."""

from __future__ import annotations

import copy
import json

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from calibration_reference import whole_model_group_inputs, whole_model_maxima
from typer.testing import CliRunner

from mistral_export.cli import app
from mistral_export.engines.onnxruntime.artifact import write_onnxruntime_artifact
from mistral_export.engines.onnxruntime.quantized import pack_nbits
from mistral_export.engines.tensorrt.precision_support import check_tensorrt_precision
from mistral_export.errors import MistralExportError
from mistral_export.export.precision import CalibrationOptions, export_precision
from mistral_export.export.precision.awq import apply_layer, awq_tensors, search_layer
from mistral_export.export.precision.calibration import calibration_samples
from mistral_export.export.precision.fp8 import fp8_scale
from mistral_export.export.precision.int4 import round_to_grid_
from mistral_export.model.config import TINY_DIR
from mistral_export.model.tokenizer import load_tokenizer
from mistral_export.runners.base import EagerRunner, prefill
from mistral_export.runners.onnxruntime import OnnxRuntimeRunner
from mistral_export.validate.thresholds import THRESHOLDS

from conftest import needs_tiny
from helpers import CHUNK, outlier_model, score

CALIBRATION = ["--calib-samples", "8", "--calib-seq-len", "96"]


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    """tiny built for ONNX Runtime in int4-awq (blocks of 64: K = 256 holds 4 of them) and fp8, one build folder."""
    out = tmp_path_factory.mktemp("int4_fp8") / "build"
    for precision, extra in (("int4-awq", ["--int4-block-size", "64"]), ("fp8", [])):
        result = CliRunner().invoke(
            app,
            [
                "build",
                "tiny",
                "-o",
                str(out),
                "--precision",
                precision,
                "--backend",
                "onnxruntime",
                *CALIBRATION,
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
    return out


def initializers(path) -> dict[str, np.ndarray]:
    # onnx_ir, not onnx.load: the build folder's data files are hard links, which onnx's loader refuses.
    return {name: value.const_value.numpy() for name, value in ir.load(str(path)).graph.initializers.items()}


@needs_tiny
@pytest.mark.parametrize("precision", ["int4-awq", "fp8"])
@pytest.mark.parametrize("portable", [True, False], ids=["model.onnx", "model.ort.onnx"])
def test_quality_bars_on_onnxruntime(build_dir, precision, portable, held_out):
    ids, reference = held_out
    measured = score(
        OnnxRuntimeRunner(build_dir / "onnx" / precision / "model.onnx", portable=portable), reference, ids
    )
    bars = THRESHOLDS[precision]
    assert measured["top1_agreement"] >= bars["top1_agreement"], measured
    assert 1 / bars["perplexity_ratio"] <= measured["perplexity_ratio"] <= bars["perplexity_ratio"], measured


@needs_tiny
def test_int4_graph_and_its_matmulnbits_artifact_hold_the_same_weights(build_dir):
    folder = build_dir / "onnx" / "int4-awq"
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 21
    meta = {p.key: p.value for p in proto.metadata_props}
    quantization = json.loads(meta["mistral_export.quantization"])
    assert quantization["awq"] is True and quantization["block_size"] == 64
    inits = initializers(folder / "model.onnx")
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    int4 = [n for n in dq if inits[n.input[0]].dtype == ml_dtypes.int4]
    assert len(int4) == len(dq) == 4 * 4 + 1  # every layer's GEMMs and the lm_head
    for node in int4:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        values, scales = inits[node.input[0]].astype(np.int8), inits[node.input[1]]
        assert attrs == {"axis": 0, "block_size": 64} and scales.dtype == np.float16
        assert scales.shape == (values.shape[0] // 64, values.shape[1]) and (scales > 0).all()
        assert values.min() >= -7 and values.max() <= 7
    # What AWQ's search rounds (round_to_grid_) is what the graph holds, for a weight read back from the graph.
    node = int4[0]
    weight = (
        inits[node.input[0]].astype(np.float32).reshape(-1, 64, inits[node.input[0]].shape[1])
        * inits[node.input[1]].astype(np.float32)[:, None, :]
    ).reshape(inits[node.input[0]].shape)
    np.testing.assert_array_equal(round_to_grid_(torch.from_numpy(weight.T.copy()), 64).numpy(), weight.T)
    # The artifact: one MatMulNBits of 4 bits per INT4 weight, same values (packed) and scales; accuracy level 4.
    artifact = onnx.load(str(folder / "model.ort.onnx"), load_external_data=False)
    packed = initializers(folder / "model.ort.onnx")
    nbits = [n for n in artifact.graph.node if n.op_type == "MatMulNBits"]
    four = [n for n in nbits if {a.name: a.i for a in n.attribute}["bits"] == 4]
    assert len(nbits) == len(four) == 17
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nbits)
    assert not [n for n in artifact.graph.node if n.op_type == "DequantizeLinear"]
    for node in int4:
        name = node.input[0].removesuffix("_quantized")
        values = inits[node.input[0]].astype(np.int8)
        np.testing.assert_array_equal(packed[f"{node.input[0]}.nbits"], pack_nbits(values, 64, 4))
        np.testing.assert_array_equal(
            packed[f"{node.input[0]}.nbits_scales"], inits[f"{name}_scale"].astype(np.float32).T.reshape(-1)
        )
    # Weight bytes: GEMM weights at about half a byte per parameter (tiny's fp16 embedding is a third of it).
    data = (folder / "model.onnx.data").stat().st_size
    embedding, params = 2048 * 256, 3_279_104
    gemm = params - embedding - 256 * 9  # and the norms
    assert data < 2 * embedding + gemm * 0.5 * 1.1


@needs_tiny
def test_fp8_graph_form(build_dir):
    path = build_dir / "onnx" / "fp8" / "model.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    inits = initializers(path)
    q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    weights = [n for n in dq if n.input[0] in inits]
    assert len(weights) == 4 * 4 and len(q) == 4 * 4 == len(dq) - len(weights)  # the lm_head stays fp16
    for node in weights:
        values, scales = inits[node.input[0]], inits[node.input[1]]
        assert values.dtype == ml_dtypes.float8_e4m3fn and scales.dtype == np.float16
        assert scales.shape == (values.shape[1],)  # one scale per output channel
        assert np.abs(values.astype(np.float32)).max(axis=0).max() == 448  # each channel's largest at E4M3's max
    for node in q:
        assert inits[node.input[1]].shape == () and inits[node.input[2]].dtype == ml_dtypes.float8_e4m3fn
    output = next(n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1].startswith("output."))
    assert inits[output.input[1]].dtype == np.float16


@needs_tiny
def test_awq_layer_by_layer_equals_the_whole_model_search(tiny):
    samples = calibration_samples(
        CalibrationOptions(samples=3, seq_len=160, tokenizer=TINY_DIR), load_tokenizer(TINY_DIR)
    )
    params = dict(tiny.named_parameters())
    streamed = dict(awq_tensors(lambda name: params[name].detach().clone(), tiny.config, samples, 64))
    assert sorted(streamed) == sorted(params)  # every parameter once
    # The reference: the whole fp32 model run step by step, then each layer searched and folded.
    whole = copy.deepcopy(tiny)
    for block, group in zip(whole.layers, whole_model_group_inputs(tiny, samples)):
        apply_layer(block, search_layer(block, group.inputs, tiny.config, 64), tiny.config)
    changed = 0
    for name, expected in whole.named_parameters():
        torch.testing.assert_close(streamed[name], expected.detach(), rtol=1e-5, atol=1e-7, msg=name)
        changed += not torch.equal(expected, params[name])
    assert changed >= 4 * 7  # the search moved every layer's norms and projections


@needs_tiny
def test_fp8_activation_scales_are_the_whole_model_ranges(build_dir):
    """The fp8 graph's static activation scales are max |x| / 448 of each GEMM input over the whole fp32 model's
    calibration steps (the build's 8 x 96 samples), though calibrated one layer at a time."""
    from mistral_export.model.checkpoint import load_model

    options = CalibrationOptions(samples=8, seq_len=96, tokenizer=TINY_DIR)
    maxima = whole_model_maxima(load_model("tiny"), calibration_samples(options, load_tokenizer(TINY_DIR)))
    inits = initializers(build_dir / "onnx" / "fp8" / "model.onnx")
    expected = {
        "layers.{}.attention.wq": "attention.wq",  # the fused QKV MatMul reads the wq input
        "layers.{}.attention.wo": "attention.wo",
        "layers.{}.feed_forward.w1": "feed_forward.w1",
        "layers.{}.feed_forward.w2": "feed_forward.w2",
    }
    scales = {name: value for name, value in inits.items() if name.endswith("_input_scale")}
    assert len(scales) == 4 * 4
    for layer in range(4):
        for pattern, linear in expected.items():
            matching = [v for k, v in scales.items() if f"layers.{layer}." in k and linear.split(".")[1] in k]
            assert len(matching) == 1, (layer, linear, sorted(scales))
            amax = maxima[pattern.format(layer)].max()
            np.testing.assert_allclose(
                matching[0].astype(np.float32), fp8_scale(amax).float().numpy(), rtol=1e-3, err_msg=pattern
            )


@needs_tiny
def test_awq_beats_round_to_nearest_on_activation_outliers(tiny, held_out, tmp_path):
    ids, reference = held_out
    model = outlier_model(tiny)
    calibration = CalibrationOptions(samples=4, seq_len=96, tokenizer=TINY_DIR)
    # The search and fold alone, layer by layer: the fp32 function is unchanged.
    params = dict(model.named_parameters())
    samples = calibration_samples(calibration, load_tokenizer(TINY_DIR))
    scaled = outlier_model(tiny)
    scaled.load_state_dict(dict(awq_tensors(lambda name: params[name].detach().clone(), model.config, samples, 128)))
    eager = EagerRunner(scaled)
    eager.reset(ids.shape[0])
    assert (prefill(eager, ids, CHUNK) - reference).abs().max() <= 1e-3 * max(1.0, float(reference.abs().max()))
    assert not torch.equal(scaled.layers[0].attention_norm.weight, model.layers[0].attention_norm.weight)
    measured = {}
    # `scaled` holds what `awq=True` folds (awq_tensors on the same samples): exported with round-to-nearest, it is
    # the AWQ model without running the search twice (the build fixture runs the --awq pipeline end to end).
    for name, source in (("rtn", model), ("awq", scaled)):
        path = export_precision(source, tmp_path / name, "int4-awq", calibration=calibration, awq=False)
        write_onnxruntime_artifact(path)  # its artifact.json describes the folder (the runner runs model.onnx itself)
        measured[name] = score(OnnxRuntimeRunner(path, portable=True), reference, ids)
    rtn, awq = measured["rtn"], measured["awq"]
    # AWQ removes at least half of round-to-nearest's perplexity excess, and gains top-1 agreement.
    assert awq["perplexity_ratio"] - 1 < 0.5 * (rtn["perplexity_ratio"] - 1), measured
    assert awq["top1_agreement"] >= rtn["top1_agreement"] + 0.02, measured


def test_option_errors(tmp_path):
    cli = CliRunner()
    result = cli.invoke(
        app, ["export", "tiny", "-o", str(tmp_path), "--precision", "int4-awq", "--int4-block-size", "48"]
    )
    assert result.exit_code == 2 and "--int4-block-size must be one of 32, 64, 128, got 48" in result.output
    result = cli.invoke(app, ["export", "tiny", "-o", str(tmp_path), "--precision", "int4-awq", "--opset", "20"])
    assert result.exit_code == 2 and "needs --opset 21 or later" in result.output
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MistralExportError, match=r"fp8 --backend tensorrt needs .* 8.9 or later .*A100 is sm 8.0"):
        check_tensorrt_precision("fp8", "NVIDIA A100", "8.0")
    check_tensorrt_precision("fp8", "NVIDIA H100", "9.0")
    check_tensorrt_precision("fp8", "NVIDIA L4", "8.9")
    check_tensorrt_precision("int4-awq", "NVIDIA A100", "8.0")


@needs_tiny
def test_validate_generate_package(build_dir, tmp_path):
    # Last in this file: `package` hard-links the artifacts, and ONNX's loaders then refuse the build's data files.
    cli = CliRunner()
    result = cli.invoke(
        app, ["validate", str(build_dir), "--quick", "--threads", "1", "--report-dir", str(tmp_path / "report")]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    rows = {a["precision"]: a for a in report["artifacts"]}
    assert sorted(rows) == ["fp8", "int4-awq"] and all(a["passed"] for a in rows.values())
    assert rows["int4-awq"]["thresholds"] == THRESHOLDS["int4-awq"]
    for precision in ("int4-awq", "fp8"):
        result = cli.invoke(
            app,
            [
                "generate",
                "--build",
                str(build_dir),
                "--backend",
                "onnxruntime",
                "--precision",
                precision,
                "--prompt",
                "def read_config(path):",
                "--max-new-tokens",
                "8",
            ],
        )
        assert result.exit_code == 0 and result.output.startswith("def read_config(path):"), result.output
        result = cli.invoke(app, ["package", str(build_dir), "-o", str(tmp_path / precision), "--precision", precision])
        assert result.exit_code == 0, result.output
        assert (tmp_path / precision / "tiny" / "config.pbtxt").exists()
