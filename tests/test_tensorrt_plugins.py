"""TensorRT plugins `mistral::SlidingWindowAttention` / `mistral::RollingCacheUpdate` in a built engine.

A one-layer ONNX graph holding the two custom nodes (domain `mistral`, `plugin_namespace="mistral"`, `aot=1` or
`aot=0`) is built into a strongly typed engine with Polygraphy and run; its attention output and updated cache
are compared with the torch reference of the op contract. Needs TensorRT and a GPU; skipped visibly elsewhere.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1] / "mistral_export"


def test_gpu_tests_build_with_the_products_builder_configuration():
    """Every engine this file builds goes through engines/tensorrt/builder.builder_config, as build_engine does (the
    aliasing preview feature included): no CreateConfig of its own."""

    def engine_configs(path: Path) -> list[str]:
        """The function making the config of each EngineFromNetwork(network, config) call in PATH."""
        calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]
        return [
            ast.unparse(c.args[1].func) if len(c.args) > 1 and isinstance(c.args[1], ast.Call) else ast.unparse(c)
            for c in calls
            if ast.unparse(c.func) == "EngineFromNetwork"
        ]

    assert engine_configs(Path(__file__)) == ["builder_config"] * 2
    builder = PACKAGE / "engines" / "tensorrt" / "builder.py"
    assert engine_configs(builder) == ["EngineFromNetwork(network, create_config, save_timing_cache=timing_cache)"]
    assert "create_config = builder_config(" in builder.read_text()


def test_only_the_plugin_module_imports_tensorrt():
    """...and tensorrt_lib, which imports it lazily for every other module (inside the functions that need it)."""
    allowed = {PACKAGE / "plugins" / "tensorrt.py", PACKAGE / "tensorrt_lib.py"}
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path not in allowed and re.search(r"^\s*(import tensorrt|from tensorrt)", path.read_text(), flags=re.M)
    ]
    assert offenders == []


def test_plugin_functions_carry_the_annotations_tensorrt_validates():
    """tensorrt.plugin checks these functions' annotations as objects when the module registers them (TensorRT 11.4:
    TensorDesc classes for inputs, a 4-tuple return type on aot_impl, List[AutoTuneCombination] from autotune), so a
    failure here is a registration error on every machine with TensorRT."""
    tree = ast.parse((PACKAGE / "plugins" / "tensorrt.py").read_text())
    futures = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    assert not any(a.name == "annotations" for n in futures for a in n.names), "string annotations fail its checks"
    decorated = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute):
                    decorated.setdefault(deco.func.attr, []).append(node)
    assert len(decorated["aot_impl"]) == 2 and len(decorated["autotune"]) == 2 and len(decorated["register"]) == 2
    assert all(f.returns is not None for f in decorated["aot_impl"] + decorated["register"])
    for f in decorated["autotune"]:
        assert f.returns is None or ast.unparse(f.returns).startswith("List["), ast.unparse(f.returns)


B, HQ, HKV, D, C, WINDOW = 2, 8, 2, 64, 32, 32
ONNX_DTYPE = {"float16": 10, "float32": 1}


def one_layer_graph(path: Path, dtype: str, aot: bool) -> None:
    """q,k,v,past_len,cache in → attention out, present key/value out: the plugin nodes of one layer."""
    import onnx
    from onnx import helper

    elem = ONNX_DTYPE[dtype]
    vi = helper.make_tensor_value_info

    def custom(op, inputs, outputs, **attrs):
        # Both implementations are registered, so each node says which one (TensorRT's parser: `aot` 1 or 0).
        return helper.make_node(
            op, inputs, outputs, domain="mistral", plugin_namespace="mistral", aot=int(aot), **attrs
        )

    nodes = [
        custom(
            "SlidingWindowAttention",
            ["q", "k", "v", "past_key", "past_value", "past_len"],
            ["attn"],
            window=WINDOW,
            scale=float(D**-0.5),
        ),
        custom("RollingCacheUpdate", ["past_key", "k", "past_len", "attn"], ["present_key"]),
        custom("RollingCacheUpdate", ["past_value", "v", "past_len", "attn"], ["present_value"]),
    ]
    graph = helper.make_graph(
        nodes,
        "one_layer",
        inputs=[
            vi("q", elem, ["B", HQ, "S", D]),
            vi("k", elem, ["B", HKV, "S", D]),
            vi("v", elem, ["B", HKV, "S", D]),
            vi("past_key", elem, ["B", HKV, C, D]),
            vi("past_value", elem, ["B", HKV, C, D]),
            vi("past_len", onnx.TensorProto.INT64, ["B"]),
        ],
        outputs=[
            vi("attn", elem, ["B", HQ, "S", D]),
            vi("present_key", elem, ["B", HKV, C, D]),
            vi("present_value", elem, ["B", HKV, C, D]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("mistral", 1)])
    onnx.save(model, path)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("aot", [False, True], ids=["jit", "aot"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_one_layer_engine_matches_reference(tmp_path, dtype, aot):
    from polygraphy.backend.trt import EngineFromNetwork, NetworkFromOnnxPath, Profile, TrtRunner

    import mistral_export.plugins.tensorrt  # noqa: F401  (registers the plugins)
    from mistral_export.engines.tensorrt.builder import builder_config
    from mistral_export.model.ops import rolling_cache_update_reference, sliding_window_attention_reference

    path = tmp_path / "one_layer.onnx"
    one_layer_graph(path, dtype, aot)
    profile = Profile()
    for name, heads in (("q", HQ), ("k", HKV), ("v", HKV)):
        profile.add(name, min=(1, heads, 1, D), opt=(B, heads, 8, D), max=(4, heads, 64, D))
    for name in ("past_key", "past_value"):
        profile.add(name, min=(1, HKV, C, D), opt=(B, HKV, C, D), max=(4, HKV, C, D))
    profile.add("past_len", min=(1,), opt=(B,), max=(4,))
    # The product's builder configuration (aliasing preview feature on); Polygraphy's TrtRunner still gives each
    # output its own buffer, so present_* checks the cache update's copy of the untouched slots too.
    build = EngineFromNetwork(NetworkFromOnnxPath(str(path), strongly_typed=True), builder_config([profile]))

    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    tolerance = 1e-4 if dtype == "float32" else 2e-3
    with TrtRunner(build) as runner:
        # A decode step and chunks shorter/longer than the window, crossing the ring's wrap-around.
        for seq, past in ((1, [5, 77]), (7, [30, 3]), (45, [0, 40])):
            feed = {
                "q": torch.randn(B, HQ, seq, D, generator=gen).to(torch_dtype),
                "k": torch.randn(B, HKV, seq, D, generator=gen).to(torch_dtype),
                "v": torch.randn(B, HKV, seq, D, generator=gen).to(torch_dtype),
                "past_key": torch.randn(B, HKV, C, D, generator=gen).to(torch_dtype),
                "past_value": torch.randn(B, HKV, C, D, generator=gen).to(torch_dtype),
                "past_len": torch.tensor(past, dtype=torch.int64),
            }
            expected_attn = sliding_window_attention_reference(
                feed["q"], feed["k"], feed["v"], feed["past_key"], feed["past_value"], feed["past_len"], WINDOW, D**-0.5
            ).float()
            expected_key = rolling_cache_update_reference(feed["past_key"], feed["k"], feed["past_len"])
            expected_value = rolling_cache_update_reference(feed["past_value"], feed["v"], feed["past_len"])
            outputs = runner.infer({n: t.numpy() for n, t in feed.items()})
            attn = torch.from_numpy(np.asarray(outputs["attn"])).float()
            rel = ((attn - expected_attn).abs().max() / expected_attn.abs().max()).item()
            assert rel <= tolerance, f"S={seq}: attention relative error {rel:.3g}"
            assert torch.equal(torch.from_numpy(np.asarray(outputs["present_key"])), expected_key)
            assert torch.equal(torch.from_numpy(np.asarray(outputs["present_value"])), expected_value)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("aot", [False, True], ids=["jit", "aot"])
def test_engine_from_exported_onnx_matches_onnxruntime(tmp_path, aot):
    """A one-layer model through `export_onnx`: its plugin nodes built by TensorRT, compared with ONNX Runtime
    (function bodies) by Polygraphy on a decode step and chunks shorter and longer than the window."""
    import onnx
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromNetwork, NetworkFromOnnxPath, Profile, TrtRunner
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    import mistral_export.plugins.tensorrt  # noqa: F401  (registers the plugins)
    from mistral_export.engines.tensorrt.builder import builder_config
    from mistral_export.export.onnx_export import export_onnx
    from mistral_export.model.checkpoint import random_model
    from mistral_export.model.config import ModelConfig

    config = ModelConfig(
        vocab_size=97,
        hidden_size=128,
        intermediate_size=192,
        num_layers=1,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        sliding_window=32,
        max_context=256,
    )
    # Both implementations are registered: each node says which one (the exporter writes `aot`).
    exported = export_onnx(random_model(config, seed=0), tmp_path / "onnx", plugin_impl="aot" if aot else "jit")
    model = onnx.load(str(exported))  # small: weights inlined into the copy TensorRT parses
    trt_path = tmp_path / "one_layer.onnx"
    onnx.save(model, str(trt_path))

    cache = (config.num_kv_heads, config.cache_capacity, config.head_dim)
    profile = Profile()
    profile.add("input_ids", min=(1, 1), opt=(2, 8), max=(2, 64))
    profile.add("past_len", min=(1,), opt=(2,), max=(2,))
    for name in ("past_key_values.0.key", "past_key_values.0.value"):
        profile.add(name, min=(1, *cache), opt=(2, *cache), max=(2, *cache))
    build = EngineFromNetwork(NetworkFromOnnxPath(str(trt_path), strongly_typed=True), builder_config([profile]))

    gen = torch.Generator().manual_seed(1)
    feeds = []
    for seq, past in ((1, [5, 77]), (7, [30, 3]), (45, [0, 40])):
        feeds.append(
            {
                "input_ids": torch.randint(0, config.vocab_size, (2, seq), generator=gen).numpy(),
                "past_len": np.array(past, dtype=np.int64),
                "past_key_values.0.key": torch.randn(2, *cache, generator=gen).numpy(),
                "past_key_values.0.value": torch.randn(2, *cache, generator=gen).numpy(),
            }
        )
    results = Comparator.run([TrtRunner(build), OnnxrtRunner(SessionFromOnnx(str(exported)))], data_loader=feeds)
    assert bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=1e-4, rtol=1e-4)))
