"""The TensorRT engine stage.

Here (no TensorRT): profile shapes from the options, artifact.json as the build folder reads it, the compatibility check
fed recorded descriptions of "this GPU", and the exported graph's shape that in-place cache aliasing relies on.
Where TensorRT and a GPU are present (markers `tensorrt`, `gpu`; run by benchmarks/gpu_check.sh): fp16, int8,
int4-awq and fp8 (Ada and later) engines of a 2-layer model through `build`, their `mistral` nodes as plugin layers, TensorRT against ONNX Runtime
through Polygraphy's Comparator and through the runner interface past the window, and the refusal of an engine
recorded for another GPU.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from mistral_export.artifacts.description import ArtifactDescription
from mistral_export.artifacts.folder import find_artifacts
from mistral_export.artifacts.gpu import GpuDescription, check_compatible, gpu_slug
from mistral_export.engines.tensorrt.builder import EngineOptions, profile_shapes, tensorrt_description
from mistral_export.errors import MistralExportError
from mistral_export.files import write_json_atomic

from conftest import small_config

H200 = GpuDescription("NVIDIA H200", "9.0", "11.4.0.106", "12.8")
CONFIG = small_config(heads=8, kv_heads=2, window=16, layers=2)


def test_profile_shapes_from_options():
    shapes = profile_shapes(CONFIG, EngineOptions(max_batch=4, opt_batch=2, max_chunk=96))
    assert shapes["input_ids"] == {"min": [1, 1], "opt": [2, 1], "max": [4, 96]}
    assert shapes["past_len"] == {"min": [1], "opt": [2], "max": [4]}
    cache = [2, 16, 32]  # kv heads, capacity (= window), head dim
    assert shapes["past_key_values.1.value"] == {"min": [1, *cache], "opt": [2, *cache], "max": [4, *cache]}
    assert len(shapes) == 2 + 2 * CONFIG.num_layers
    no_window = profile_shapes(CONFIG.replace(sliding_window=None, max_context=256), EngineOptions())
    assert no_window["past_key_values.0.key"]["max"] == [8, 2, 256, 32]  # linear cache of the maximum context


@pytest.mark.parametrize(
    "options, message",
    [
        (EngineOptions(max_batch=0), "--max-batch must be at least 1"),
        (EngineOptions(max_batch=2, opt_batch=3), "--opt-batch must be between 1 and --max-batch"),
        (EngineOptions(max_chunk=0), "--max-chunk must be at least 1"),
        (EngineOptions(builder_optimization_level=7), "--builder-opt-level must be between 0 and 5"),
    ],
)
def test_bad_engine_options_name_the_option(options, message):
    with pytest.raises(MistralExportError, match=message):
        profile_shapes(CONFIG, options)


def test_version_floors_are_the_ones_checked_at_run_time():
    """pyproject's floors (tensorrt 10.15: get_aliased_input_tensor; triton 3.3: ASTSource constexprs/attrs) are the
    versions the run-time checks refuse below, with a message naming the version found."""
    import re
    from pathlib import Path

    from mistral_export.plugins import aot
    from mistral_export.tensorrt_lib import MIN_TENSORRT, too_old

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floors = {
        name: {tuple(map(int, v.split("."))) for v in re.findall(rf'"{name}>=([\d.]+)"', pyproject)}
        for name in ("tensorrt", "triton")
    }
    assert floors == {"tensorrt": {MIN_TENSORRT}, "triton": {aot.MIN_TRITON}}
    assert "older than 10.15" in too_old("10.14.1.48") and too_old("10.15.0.1") is None and too_old("11.4.0") is None


def test_gpu_slug():
    assert gpu_slug("NVIDIA H200") == "h200"
    assert gpu_slug("NVIDIA GeForce RTX 4090") == "geforce-rtx-4090"
    assert gpu_slug("NVIDIA A100-SXM4-80GB") == "a100-sxm4-80gb"
    assert H200.folder_name == "h200-sm90"


@pytest.fixture(scope="module")
def fp16_onnx(tmp_path_factory):
    from mistral_export.export.onnx_export import export_onnx
    from mistral_export.model.checkpoint import random_model

    return export_onnx(random_model(CONFIG), tmp_path_factory.mktemp("fp16-onnx"), dtype=torch.float16)


def write_engine(tmp_path, onnx_path, gpu=H200, precision="fp16"):
    """An engine folder as the TensorRT stage leaves it, its artifact.json from the stage's own writer (the plan
    itself needs TensorRT)."""
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    write_json_atomic(build_dir / "build.json", {"format": 1, "model": {"source": None}})
    folder = build_dir / "engines" / gpu.folder_name / precision
    folder.mkdir(parents=True)
    tensorrt_description(
        onnx_path,
        gpu,
        precision=precision,
        options=EngineOptions(max_batch=4),
        plugin_impl="aot",
        build_seconds=12.345,
        ptx_isa=80,
        cache_copies=(),
    ).write(folder)
    return build_dir, folder


def test_engine_json_is_found_where_the_layout_says(tmp_path, fp16_onnx):
    build_dir, folder = write_engine(tmp_path, fp16_onnx)
    [artifact] = find_artifacts(build_dir, backend="tensorrt")
    assert artifact.folder == folder and artifact.label == "tensorrt/fp16@h200"
    trt = json.loads((folder / "artifact.json").read_text())["tensorrt"]
    assert trt["gpu"] == "NVIDIA H200" and trt["compute_capability"] == "9.0" and trt["version"] == "11.4.0.106"
    assert trt["profiles"][0]["input_ids"]["max"] == [4, 512] and trt["options"]["max_batch"] == 4
    assert trt["ptx_isa"] == "8.0" and trt["cache_copies"] == []  # the AOT kernels' ISA; no copy of the cache
    description = artifact.description
    assert description.build_seconds == 12.35 and description.cache.capacity == 16
    assert description.cache.dtype == "float16" and description.config.to_hf_dict() == CONFIG.to_hf_dict()
    # the I/O is the ONNX graph's, read at build: names, element types, symbolic dims by name
    graph = onnx.load(str(fp16_onnx), load_external_data=False).graph
    assert [t.name for t in description.io.inputs] == [v.name for v in graph.input]
    assert [t.name for t in description.io.outputs] == [v.name for v in graph.output]
    assert description.io.input("past_key_values.1.value").shape[1:] == (2, 16, 32)
    assert description.io.output("logits").dtype == "float16" and description.io.input("input_ids").dtype == "int64"
    assert ArtifactDescription.from_json(description.to_json(), "again") == description
    assert (description.tensorrt.max_batch, description.tensorrt.max_chunk) == (4, 512)


def test_engine_json_with_a_missing_field_is_refused_by_name(tmp_path, fp16_onnx):
    build_dir, folder = write_engine(tmp_path, fp16_onnx)
    document = json.loads((folder / "artifact.json").read_text())
    del document["tensorrt"]["compute_capability"]
    (folder / "artifact.json").write_text(json.dumps(document))
    with pytest.raises(MistralExportError, match=r"artifact.json: no 'tensorrt.compute_capability' field"):
        find_artifacts(build_dir)


def test_compatibility_check_against_recorded_gpus(tmp_path, fp16_onnx):
    _, folder = write_engine(tmp_path, fp16_onnx)
    built = ArtifactDescription.read(folder).tensorrt.gpu_description
    assert check_compatible(built, H200, folder) == []
    with pytest.raises(
        MistralExportError,
        match=r"built for NVIDIA H200 \(sm 9.0\); this machine has NVIDIA A100-SXM4-80GB "
        r"\(sm 8.0\)",
    ):
        check_compatible(built, GpuDescription("NVIDIA A100-SXM4-80GB", "8.0", "11.4.0.106"), folder)
    with pytest.raises(MistralExportError, match="built with TensorRT 11.4.0.106; this machine has TensorRT 11.5.0.1"):
        check_compatible(built, GpuDescription("NVIDIA H200", "9.0", "11.5.0.1"), folder)
    [warning] = check_compatible(built, GpuDescription("NVIDIA H100 80GB HBM3", "9.0", "11.4.0.106"), folder)
    assert "built on NVIDIA H200, running on NVIDIA H100 80GB HBM3" in warning


def test_exported_cache_outputs_can_alias_their_inputs(fp16_onnx):
    """TensorRT aliases present.* to past_key_values.* only if each is RollingCacheUpdate's output on that very input."""
    graph = onnx.load(str(fp16_onnx), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    for i in range(CONFIG.num_layers):
        for kind in ("key", "value"):
            node = producer[f"present.{i}.{kind}"]
            assert (node.domain, node.op_type, node.input[0]) == (
                "mistral",
                "RollingCacheUpdate",
                f"past_key_values.{i}.{kind}",
            )


# ------------------------------------------------------------------------------------------------------------------
# Where TensorRT and a GPU are present
# ------------------------------------------------------------------------------------------------------------------


# vocab: the tiny fixture's tokenizer's, for the calibrated precisions; K (128, 192, 512) takes int4 blocks of 64.
GPU_CONFIG = small_config(
    head_dim=64, heads=8, kv_heads=2, window=32, layers=2, hidden=128, vocab=2048, intermediate=192
)


@pytest.fixture(scope="module", params=["fp16", "int8", "int4-awq", "fp8"])
def engine_build(request, tmp_path_factory):
    from mistral_export.model.checkpoint import random_model, save_hf_checkpoint
    from mistral_export.model.config import TINY_DIR
    from mistral_export.pipeline.build import PrecisionOptions, build

    out = tmp_path_factory.mktemp(f"trt-{request.param}")
    model = random_model(GPU_CONFIG, seed=0)
    checkpoint = out / "checkpoint"  # a folder with a tokenizer: calibration reads text
    save_hf_checkpoint(model, checkpoint)
    shutil.copy(TINY_DIR / "tokenizer.json", checkpoint / "tokenizer.json")
    options = EngineOptions(max_batch=2, opt_batch=1, max_chunk=80, timing_cache=out / "timing.cache")
    quantization = PrecisionOptions(int4_block_size=64, calib_samples=8, calib_seq_len=64)
    try:
        build(checkpoint, out, request.param, "tensorrt", engine_options=options, precision_options=quantization)
    except MistralExportError as exc:
        if "FP8 tensor cores" in str(exc):  # this GPU is older than Ada: the refusal is the expected outcome
            pytest.skip(str(exc))
        raise
    build(checkpoint, out, request.param, "onnxruntime", precision_options=quantization)  # the reference beside it
    return out, request.param


def _engine_artifact(out):
    [artifact] = find_artifacts(out, backend="tensorrt")
    return artifact


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_mistral_nodes_become_plugin_layers(engine_build):
    import tensorrt as trt
    from polygraphy.backend.trt import EngineFromPath

    out, _ = engine_build
    artifact = _engine_artifact(out)
    engine = EngineFromPath(str(artifact.folder / "model.plan"))()
    inspector = engine.create_engine_inspector()
    layers = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))["Layers"]
    plugins = [layer for layer in layers if isinstance(layer, dict) and "Plugin" in layer.get("LayerType", "")]
    # one attention and two cache updates per layer, none of them inlined from the function bodies
    assert len(plugins) == 3 * GPU_CONFIG.num_layers, [layer.get("LayerType") for layer in layers]
    for i in range(GPU_CONFIG.num_layers):
        for kind in ("key", "value"):
            assert engine.get_aliased_input_tensor(f"present.{i}.{kind}") in (None, f"past_key_values.{i}.{kind}")
    # What the build recorded from the same inspector: the copies of a cache tensor (none expected) and the PTX ISA.
    section = artifact.description.tensorrt
    assert section.cache_copies == () and section.ptx_isa is not None


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_matches_onnxruntime_through_polygraphy_comparator(engine_build):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromPath, TrtRunner
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    out, precision = engine_build
    artifact = _engine_artifact(out)
    onnx_path = out / "onnx" / precision / "model.onnx"
    window, c = GPU_CONFIG.sliding_window, GPU_CONFIG
    gen = torch.Generator().manual_seed(0)
    cache_shape = (2, c.num_kv_heads, c.cache_capacity, c.head_dim)
    feeds = []
    for seq, past in ((window + 9, [0, 0]), (1, [window + 3, 3 * window]), (7, [2 * window - 2, 5])):
        feed = {
            "input_ids": torch.randint(0, c.vocab_size, (2, seq), generator=gen).numpy(),
            "past_len": np.array(past, dtype=np.int64),
        }
        for i in range(c.num_layers):
            for kind in ("key", "value"):
                feed[f"past_key_values.{i}.{kind}"] = torch.randn(cache_shape, generator=gen).half().numpy()
        feeds.append(feed)
    runners = [
        TrtRunner(EngineFromPath(str(artifact.folder / "model.plan"))),
        OnnxrtRunner(SessionFromOnnx(str(onnx_path))),
    ]
    results = Comparator.run(runners, data_loader=feeds)
    tolerance = 5e-2 if precision == "fp16" else 2e-1
    assert bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=tolerance, rtol=tolerance)))


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_runner_matches_onnxruntime_runner_past_the_window(engine_build):
    from mistral_export.artifacts.folder import select_artifact
    from mistral_export.runners import open_runner
    from mistral_export.runners.base import prefill

    out, precision = engine_build
    trt_runner = open_runner(select_artifact(out, "tensorrt", precision))
    ort_runner = open_runner(select_artifact(out, "onnxruntime", precision))
    window = GPU_CONFIG.sliding_window
    prompt = torch.randint(0, GPU_CONFIG.vocab_size, (2, 2 * window + 5), generator=torch.Generator().manual_seed(3))
    tolerance = 5e-2 if precision == "fp16" else 2e-1
    for runner in (trt_runner, ort_runner):
        runner.reset(2)
    expected, got = prefill(ort_runner, prompt, window - 3), prefill(trt_runner, prompt, window - 3)
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()
    position = torch.full((2,), prompt.shape[1])
    for step in range(2 * window):  # decode steps (CUDA graph replays after the first) across the ring's wrap
        token = expected[:, -1:].argmax(-1)
        expected, got = ort_runner.step(token, position), trt_runner.step(token, position)
        assert (got - expected).abs().max() <= tolerance * expected.abs().max(), f"decode step {step}"
        position += 1


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_recorded_for_another_gpu_is_refused_before_running(engine_build, tmp_path):
    from mistral_export.runners.tensorrt import TensorRTRunner

    out, _ = engine_build
    copy = tmp_path / "engine"
    shutil.copytree(_engine_artifact(out).folder, copy)
    document = json.loads((copy / "artifact.json").read_text())
    document["tensorrt"].update(gpu="NVIDIA Other GPU", compute_capability="1.0")
    (copy / "artifact.json").write_text(json.dumps(document))
    with pytest.raises(MistralExportError, match=r"built for NVIDIA Other GPU \(sm 1.0\); this machine has"):
        TensorRTRunner(copy)
