"""Which layers of a built engine copy a cache tensor (engines/tensorrt/inspection.py), and validate reporting it.

The engine information below is written by hand in the format TensorRT documents for
IEngineInspector.get_engine_information(LayerInformationFormat.JSON) on an engine built with
ProfilingVerbosity.DETAILED (TensorRT developer guide, "Engine Inspector"): "Layers" holds one object per layer with
its Name, LayerType, Inputs/Outputs (Name, Location, Dimensions, Format/Datatype), tactic and metadata; "Bindings" the
I/O names. It is not output of a real engine (no machine of the project has TensorRT): the parse is checked here, the
TensorRT call (`engine_cache_copies`) only where TensorRT is installed.
"""

from __future__ import annotations

import copy
import json

import pytest

from mistral_export.engines.tensorrt.inspection import cache_copies


def _tensor(name, dims, fmt="Row major linear FP16 format"):
    return {"Name": name, "Location": "Device", "Dimensions": dims, "Format/Datatype": fmt}


CACHE = [-1, 2, 16, 32]
ENGINE_INFORMATION = {
    "Layers": [
        {
            "Name": "/embed/Gather",
            "LayerType": "Gather",
            "Inputs": [_tensor("input_ids", [-1, -1], "Int64")],
            "Outputs": [_tensor("/embed/Gather_output_0", [-1, -1, 64])],
            "ParameterType": "Gather",
            "TacticValue": "0x0000000000000000",
            "StreamId": 0,
            "Metadata": "[ONNX Layer: /embed/Gather]",
        },
        {
            "Name": "{ForeignNode[/layers.0/attention_norm/Pow.../layers.0/attention/Reshape_2]}",
            "LayerType": "Myelin",
            "Inputs": [_tensor("/embed/Gather_output_0", [-1, -1, 64]), _tensor("past_len", [-1], "Int64")],
            "Outputs": [
                _tensor("/layers.0/attention/q", [-1, 8, -1, 32]),
                _tensor("/layers.0/attention/k", [-1, 2, -1, 32]),
                _tensor("/layers.0/attention/v", [-1, 2, -1, 32]),
            ],
            "TacticValue": "0x0000000000000000",
            "StreamId": 0,
            "Metadata": "",
        },
        {
            "Name": "/layers.0/attention/SlidingWindowAttention",
            "LayerType": "PluginV3",
            "Inputs": [
                _tensor("/layers.0/attention/q", [-1, 8, -1, 32]),
                _tensor("/layers.0/attention/k", [-1, 2, -1, 32]),
                _tensor("/layers.0/attention/v", [-1, 2, -1, 32]),
                _tensor("past_key_values.0.key", CACHE),
                _tensor("past_key_values.0.value", CACHE),
                _tensor("past_len", [-1], "Int64"),
            ],
            "Outputs": [_tensor("/layers.0/attention/out", [-1, 8, -1, 32])],
            "ParameterType": "PluginV3",
            "TacticValue": "0x0000000000000000",
            "StreamId": 0,
            "Metadata": "[ONNX Layer: /layers.0/attention/SlidingWindowAttention]",
        },
        {
            "Name": "/layers.0/attention/RollingCacheUpdate",
            "LayerType": "PluginV3",
            "Inputs": [
                _tensor("past_key_values.0.key", CACHE),
                _tensor("/layers.0/attention/k", [-1, 2, -1, 32]),
                _tensor("past_len", [-1], "Int64"),
                _tensor("/layers.0/attention/out", [-1, 8, -1, 32]),
            ],
            "Outputs": [_tensor("present.0.key", CACHE)],
            "ParameterType": "PluginV3",
            "TacticValue": "0x0000000000000000",
            "StreamId": 0,
            "Metadata": "",
        },
        {
            "Name": "/layers.0/attention/RollingCacheUpdate_1",
            "LayerType": "PluginV3",
            "Inputs": [
                _tensor("past_key_values.0.value", CACHE),
                _tensor("/layers.0/attention/v", [-1, 2, -1, 32]),
                _tensor("past_len", [-1], "Int64"),
                _tensor("/layers.0/attention/out", [-1, 8, -1, 32]),
            ],
            "Outputs": [_tensor("present.0.value", CACHE)],
            "ParameterType": "PluginV3",
            "TacticValue": "0x0000000000000000",
            "StreamId": 0,
            "Metadata": "",
        },
        {
            "Name": "{ForeignNode[/layers.0/attention/wo/MatMul.../lm_head/MatMul]}",
            "LayerType": "Myelin",
            "Inputs": [_tensor("/layers.0/attention/out", [-1, 8, -1, 32])],
            "Outputs": [_tensor("logits", [-1, -1, 97])],
            "TacticValue": "0x0000000000000000",
            "StreamId": 0,
            "Metadata": "",
        },
    ],
    "Bindings": [
        "input_ids",
        "past_len",
        "past_key_values.0.key",
        "past_key_values.0.value",
        "logits",
        "present.0.key",
        "present.0.value",
    ],
}


def test_an_engine_without_copies_of_the_cache():
    assert cache_copies(json.dumps(ENGINE_INFORMATION), layers=1) == ()


def test_inserted_copies_of_a_cache_tensor_are_named():
    information = copy.deepcopy(ENGINE_INFORMATION)
    layers = information["Layers"]
    # TensorRT honouring the aliasing by copying: the value cache into a scratch tensor before its update, and the
    # key update's result into the engine output.
    layers[4]["Inputs"][0] = _tensor("past_key_values.0.value copy", CACHE)
    layers.insert(
        4,
        {
            "Name": "Reformatting CopyNode for Input Tensor 0 to /layers.0/attention/RollingCacheUpdate_1",
            "LayerType": "Reformat",
            "Inputs": [_tensor("past_key_values.0.value", CACHE)],
            "Outputs": [_tensor("past_key_values.0.value copy", CACHE)],
            "ParameterType": "Reformat",
            "Origin": "REFORMAT",
            "TacticValue": "0x00000000000003ea",
            "StreamId": 0,
            "Metadata": "",
        },
    )
    layers[3]["Outputs"][0] = _tensor("/layers.0/attention/RollingCacheUpdate_output_0", CACHE)
    layers.append(
        {
            "Name": "/layers.0/attention/RollingCacheUpdate_output_0 copy",
            "LayerType": "Reformat",
            "Inputs": [_tensor("/layers.0/attention/RollingCacheUpdate_output_0", CACHE)],
            "Outputs": [_tensor("present.0.key", CACHE)],
            "ParameterType": "Reformat",
            "Origin": "REFORMAT",
            "TacticValue": "0x00000000000003e8",
            "StreamId": 0,
            "Metadata": "",
        }
    )
    assert cache_copies(information, layers=1) == (
        "Reformatting CopyNode for Input Tensor 0 to /layers.0/attention/RollingCacheUpdate_1",
        "/layers.0/attention/RollingCacheUpdate_output_0 copy",
    )


def test_layer_names_only_are_refused():
    """An engine built without ProfilingVerbosity.DETAILED lists layer names only: no way to see the copies."""
    with pytest.raises(ValueError, match="ProfilingVerbosity.DETAILED"):
        cache_copies({"Layers": [layer["Name"] for layer in ENGINE_INFORMATION["Layers"]], "Bindings": []}, 1)


def test_validate_reports_the_cache_copies_the_build_recorded(tiny_build, tmp_path):
    """validate's report carries, per TensorRT engine, the PTX ISA and cache copies its artifact.json records (the
    description written by the build's own writer), and warns where TensorRT copies the cache."""
    from mistral_export.artifacts.folder import find_artifacts
    from mistral_export.artifacts.gpu import GpuDescription
    from mistral_export.engines.tensorrt.builder import EngineOptions, tensorrt_description
    from mistral_export.validate.suite import artifact_report, cache_copy_warnings

    gpu = GpuDescription("NVIDIA H200", "9.0", "11.4.0.106", "12.8")
    onnx_path = tiny_build / "onnx" / "fp32" / "model.onnx"
    for name, copies in (("clean", ()), ("copying", ("present.0.key copy",))):
        build = tmp_path / name
        folder = build / "engines" / gpu.folder_name / "fp32"
        folder.mkdir(parents=True)
        (build / "build.json").write_text((tiny_build / "build.json").read_text())
        tensorrt_description(
            onnx_path,
            gpu,
            precision="fp32",
            options=EngineOptions(),
            plugin_impl="aot",
            build_seconds=1.0,
            ptx_isa=80,
            cache_copies=copies,
        ).write(folder)
    [clean] = find_artifacts(tmp_path / "clean", backend="tensorrt")
    [copying] = find_artifacts(tmp_path / "copying", backend="tensorrt")
    assert artifact_report(clean, skipped="no TensorRT")["tensorrt"] == {"ptx_isa": "8.0", "cache_copies": []}
    assert artifact_report(copying, skipped="no TensorRT")["tensorrt"]["cache_copies"] == ["present.0.key copy"]
    assert cache_copy_warnings([clean]) == []
    [warning] = cache_copy_warnings([clean, copying])
    assert (
        "tensorrt/fp32@h200: TensorRT inserted 1 copy of cache tensors" in warning and "present.0.key copy" in warning
    )
    from mistral_export.artifacts.describe import describe_build

    described = " ".join(value for _, value in describe_build(tmp_path / "copying"))
    assert "plugins aot (PTX ISA 8.0), cache copies inserted by TensorRT: 1" in described
