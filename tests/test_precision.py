"""Precisions of the exported ONNX (fp16, int8 W8A8 SmoothQuant, int8-wo): quality bars on ONNX Runtime against the
fp32 eager model, the portable graphs' form, the ONNX Runtime artifacts, calibration, SmoothQuant, the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from calibration_reference import whole_model_maxima
from typer.testing import CliRunner

from mistral_export.cli import app
from mistral_export.engines.onnxruntime.artifact import write_onnxruntime_artifact
from mistral_export.errors import MistralExportError
from mistral_export.export.onnx_export import export_onnx
from mistral_export.export.precision import CalibrationOptions, export_precision
from mistral_export.export.precision.calibration import DEFAULT_TEXT, calibration_samples, step_plan
from mistral_export.export.precision.smoothquant import smooth
from mistral_export.model.checkpoint import random_model
from mistral_export.model.config import TINY_DIR
from mistral_export.model.tokenizer import load_tokenizer
from mistral_export.runners.base import EagerRunner, greedy_tokens, prefill
from mistral_export.runners.onnxruntime import OnnxRuntimeRunner
from mistral_export.validate.thresholds import THRESHOLDS

from conftest import needs_tiny, small_config
from helpers import CHUNK, outlier_model, score

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["class Parser:", "def read_config(path):", "    def __init__(self", "import os\n\n", "for key, value in "]
GREEDY_TOKENS = int(THRESHOLDS["fp16"]["greedy_match_tokens"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """tiny in each quantized precision with its ONNX Runtime artifact; int8 through the command line."""
    root = tmp_path_factory.mktemp("precisions")
    paths = {}
    for precision in ("fp16", "int8-wo"):
        paths[precision] = export_precision("tiny", root / precision, precision)
        write_onnxruntime_artifact(paths[precision])
    result = CliRunner().invoke(
        app,
        [
            "export",
            "tiny",
            "-o",
            str(root / "int8"),
            "--precision",
            "int8",
            "--calib-samples",
            "8",
            "--calib-seq-len",
            "96",
        ],
    )
    assert result.exit_code == 0, result.output
    paths["int8"] = root / "int8" / "model.onnx"
    return paths


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@needs_tiny
@pytest.mark.parametrize("precision", ["fp16", "int8", "int8-wo"])
def test_quality_bars_on_onnxruntime(exported, precision, tiny, held_out):
    ids, reference = held_out
    runner = OnnxRuntimeRunner(exported[precision])
    measured = score(runner, reference, ids)
    bars = THRESHOLDS[precision]
    assert measured["top1_agreement"] >= bars["top1_agreement"], measured
    if "perplexity_ratio" in bars:
        assert 1 / bars["perplexity_ratio"] <= measured["perplexity_ratio"] <= bars["perplexity_ratio"], measured
    # The fixture prompts: top-1 over eager's greedy continuation (teacher-forced); fp16 greedy identical to eager's.
    tokenizer = load_tokenizer(TINY_DIR)
    eager = EagerRunner(tiny)
    agree = total = 0
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        expected = list(greedy_tokens(eager, ids, GREEDY_TOKENS))
        if precision == "fp16":
            assert list(greedy_tokens(runner, ids, GREEDY_TOKENS)) == expected, prompt
        runner.reset(1)
        predicted = prefill(runner, torch.tensor([ids + expected]))[0, len(ids) - 1 : -1].argmax(-1)
        agree += int((predicted == torch.tensor(expected)).sum())
        total += len(expected)
    assert agree / total >= bars["top1_agreement"], (agree, total)


@needs_tiny
@pytest.mark.parametrize("precision", ["fp16", "int8", "int8-wo"])
def test_portable_graph_form(exported, precision):
    path = exported[precision]
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    custom = [n for n in proto.graph.node if n.domain == "mistral"]
    assert len(custom) == 3 * 4
    for node in custom:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"mistral" and attrs["aot"] == 1
    assert sorted(f.name for f in proto.functions) == ["RollingCacheUpdate", "SlidingWindowAttention"]
    meta = metadata(path)
    assert meta["mistral_export.precision"] == precision
    assert meta["mistral_export.dtype"] == "float16"
    for key in ("config", "model_name", "cache_capacity", "cache_wraps", "window", "plugin_impl", "last_token_logits"):
        assert f"mistral_export.{key}" in meta
    params = 3_279_104
    data = (path.parent / "model.onnx.data").stat().st_size
    if precision == "fp16":
        assert data >= 2 * params
        return
    # Every GEMM weight (all but the embedding table and norms) as int8: about one byte per parameter.
    embedding = 2048 * 256
    assert data < 2 * embedding + (params - embedding) * 1.1
    quantization = json.loads(meta["mistral_export.quantization"])
    inits = {i.name: i for i in proto.graph.initializer}
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    weights = [
        n for n in dq if inits.get(n.input[0]) is not None and inits[n.input[0]].data_type == onnx.TensorProto.INT8
    ]
    assert len(weights) == 4 * 4 + 1  # per layer qkv, wo, w1+w3, w2; and the output projection
    for node in [*dq, *(n for n in proto.graph.node if n.op_type == "QuantizeLinear")]:
        zero = onnx.numpy_helper.to_array(inits[node.input[2]], base_dir=str(path.parent))
        assert zero.dtype == np.int8 and not zero.any()  # symmetric: what TensorRT requires
    activations = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    if precision == "int8":
        assert len(activations) == len(weights)
        assert quantization["smoothquant_alpha"] == 0.5
        assert quantization["calibration"]["samples"] == 8 and quantization["calibration"]["seq_len"] == 96
    else:
        assert activations == [] and quantization["method"] == "W8A16 weight-only"


@needs_tiny
@pytest.mark.parametrize("precision", ["int8", "int8-wo"])
def test_onnxruntime_artifact_runs_the_same_int8_weights_as_matmulnbits(exported, precision):
    path = exported[precision]
    artifact = onnx.load(str(path.parent / "model.ort.onnx"), load_external_data=False)
    ops = [n.op_type for n in artifact.graph.node]
    assert ops.count("MatMulNBits") == 17 and "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    for node in (n for n in artifact.graph.node if n.op_type == "MatMulNBits"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        # Blocks as large as K allows, up to 128 (MLAS's fastest at decode; weights have one scale per output channel).
        assert (attrs["bits"], attrs["accuracy_level"]) == (8, 4) and attrs["block_size"] == min(
            128, attrs["K"] & -attrs["K"]
        )
    # The output projection's bytes are model.onnx's int8 weights (+128, transposed): nothing requantized.
    full = onnx.load(str(path.parent / "model.ort.onnx"))
    packed = next(
        onnx.numpy_helper.to_array(i)
        for i in full.graph.initializer
        if i.name.startswith("output.") and i.name.endswith(".nbits")
    )
    portable = onnx.load(str(path))
    weight = next(
        onnx.numpy_helper.to_array(i)
        for i in portable.graph.initializer
        if i.name.startswith("output.") and i.name.endswith("_quantized")
    )
    np.testing.assert_array_equal(packed.reshape(2048, -1)[:, :256].astype(np.int16) - 128, weight.T)
    assert (path.parent / "model.ort.onnx.data").exists()
    # The embedding stays fp16 (model.onnx's values), only its gathered rows cast to the fp32 activations.
    [table] = [i for i in full.graph.initializer if i.name == "tok_embeddings.weight"]
    [original] = [i for i in portable.graph.initializer if i.name == "tok_embeddings.weight"]
    assert table.data_type == onnx.TensorProto.FLOAT16
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(table), onnx.numpy_helper.to_array(original))
    [gather] = [n for n in artifact.graph.node if n.op_type == "Gather" and n.input[0] == table.name]
    [cast] = [n for n in artifact.graph.node if list(n.input) == [gather.output[0]]]
    assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT


@needs_tiny
def test_smoothquant_matters_on_activation_outliers(tiny, held_out, tmp_path):
    ids, reference = held_out
    model = outlier_model(tiny)
    eager = EagerRunner(model)
    eager.reset(ids.shape[0])
    assert (prefill(eager, ids, CHUNK) - reference).abs().max() < 1e-3  # same function in fp32
    calibration = CalibrationOptions(samples=4, seq_len=96, tokenizer=TINY_DIR)
    measured = {}
    for name, alpha in (("plain", None), ("smoothquant", 0.5)):
        # The portable Q/DQ graph, whose static activation scales are what SmoothQuant changes (TensorRT's input).
        path = export_precision(model, tmp_path / name, "int8", calibration=calibration, smoothquant_alpha=alpha)
        write_onnxruntime_artifact(path)  # its artifact.json describes the folder (the runner runs model.onnx itself)
        measured[name] = score(OnnxRuntimeRunner(path, portable=True), reference, ids)
    plain, smoothed = measured["plain"], measured["smoothquant"]
    assert smoothed["top1_agreement"] >= plain["top1_agreement"] + 0.05, measured
    assert smoothed["perplexity_ratio"] < plain["perplexity_ratio"] - 0.02, measured
    assert smoothed["top1_agreement"] >= THRESHOLDS["int8"]["top1_agreement"], measured


@needs_tiny
def test_smoothed_model_computes_the_same_function(tiny, held_out):
    ids, reference = held_out
    samples = calibration_samples(CalibrationOptions(samples=4, seq_len=64), load_tokenizer(TINY_DIR))
    maxima = whole_model_maxima(tiny, samples)
    smoothed = copy.deepcopy(tiny)
    smooth(smoothed, maxima, alpha=0.5)
    changed = [n for n, p in smoothed.named_parameters() if not torch.equal(p, tiny.get_parameter(n))]
    assert len(changed) == 4 * 9  # per layer: both norms and all seven projections
    eager = EagerRunner(smoothed)
    eager.reset(ids.shape[0])
    assert (prefill(eager, ids, CHUNK) - reference).abs().max() <= 1e-4 * max(1.0, float(reference.abs().max()))


def test_calibration_step_plan_is_prefill_chunks_then_decode():
    # Layer-by-layer calibration runs these steps; tests/test_layerwise_calibration.py checks it equals the whole model.
    assert step_plan(256, 64) == [(0, 64), (64, 64), (128, 64), (192, 56), *[(p, 1) for p in range(248, 256)]]
    assert step_plan(8, 64) == [(0, 6), (6, 1), (7, 1)]


def test_calibration_text_errors(tmp_path):
    tokenizer = load_tokenizer(TINY_DIR)
    with pytest.raises(MistralExportError, match="no such file"):
        calibration_samples(CalibrationOptions(data=tmp_path / "missing.txt"), tokenizer)
    short = tmp_path / "short.txt"
    short.write_text("def f():\n    return 1\n")
    with pytest.raises(MistralExportError, match=r"short.txt: \d+ tokens make 0 samples of 256 tokens, 32 requested"):
        calibration_samples(CalibrationOptions(data=short), tokenizer)
    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps({"text": "x = 1\n" * 40}) + "\n\n" + json.dumps({"text": "y = 2\n" * 40}) + "\n")
    samples = calibration_samples(CalibrationOptions(data=lines, samples=2, seq_len=50), tokenizer)
    assert [len(s) for s in samples] == [50, 50] and samples[0][0] == tokenizer.bos_id
    lines.write_text('{"content": "x"}\n')
    with pytest.raises(MistralExportError, match=r"data.jsonl, line 1: expected an object with a \"text\" string"):
        calibration_samples(CalibrationOptions(data=lines), tokenizer)
    # The shipped default text suffices for the default options.
    assert len(calibration_samples(CalibrationOptions(), tokenizer)) == 32 and DEFAULT_TEXT.is_file()


class QuantLinear(torch.nn.Linear):
    """What a quantization toolkit leaves in a model: a Linear subclass with its own state."""


def test_exporter_refuses_models_it_would_export_wrong(tmp_path):
    config = small_config()
    model = random_model(config)
    model.layers[0].attention.wq.register_buffer("pre_quant_scale", torch.ones(config.hidden_size))
    for call in (lambda: export_onnx(model, tmp_path), lambda: export_precision(model, tmp_path, "int8-wo")):
        with pytest.raises(MistralExportError, match=r"layers.0.attention.wq.pre_quant_scale .*pre_quant_scale"):
            call()
    model = random_model(config)
    model.layers[1].feed_forward.w2 = QuantLinear(config.intermediate_size, config.hidden_size, bias=False)
    with pytest.raises(MistralExportError, match=r"'layers.1.feed_forward.w2' is a test_precision.QuantLinear"):
        export_onnx(model, tmp_path)
    model = random_model(config)
    model.norm.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(MistralExportError, match="'norm' has forward hooks"):
        export_precision(model, tmp_path, "fp16")
    assert list(tmp_path.iterdir()) == []


def test_export_command_option_errors(tmp_path):
    cli = CliRunner()
    result = cli.invoke(
        app, ["export", "tiny", "-o", str(tmp_path), "--precision", "int8", "--calib-data", str(tmp_path / "none.txt")]
    )
    assert result.exit_code == 2 and "none.txt: no such file" in result.output and "Traceback" not in result.output
    result = cli.invoke(
        app, ["export", "tiny", "-o", str(tmp_path), "--precision", "int8", "--smoothquant-alpha", "1.5"]
    )
    assert result.exit_code == 2 and "--smoothquant-alpha must be within [0, 1], got 1.5" in result.output
    result = cli.invoke(app, ["export", "tiny", "-o", str(tmp_path), "--precision", "int4"])
    assert result.exit_code == 2 and "int4" in result.output
