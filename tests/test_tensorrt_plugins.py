"""TensorRT plugins `mistral::SlidingWindowAttention` / `mistral::RollingCacheUpdate` in a built engine.

A one-layer ONNX graph holding the two custom nodes (domain `mistral`, `plugin_namespace="mistral"`, optionally
`aot=1`) is built into a strongly typed engine with Polygraphy and run; its attention output and updated cache
are compared with the torch reference of the op contract. Needs TensorRT and a GPU; skipped visibly elsewhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1] / "mistral_export"


def test_only_the_plugin_module_imports_tensorrt():
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path != PACKAGE / "plugins" / "tensorrt.py"
        and re.search(r"^\s*(import tensorrt|from tensorrt)", path.read_text(), flags=re.M)
    ]
    assert offenders == []


B, HQ, HKV, D, C, WINDOW = 2, 8, 2, 64, 32, 32
ONNX_DTYPE = {"float16": 10, "float32": 1}


def one_layer_graph(path: Path, dtype: str, aot: bool) -> None:
    """q,k,v,past_len,cache in → attention out, present key/value out: the plugin nodes of one layer."""
    import onnx
    from onnx import helper

    elem = ONNX_DTYPE[dtype]
    vi = helper.make_tensor_value_info

    def custom(op, inputs, outputs, **attrs):
        return helper.make_node(op, inputs, outputs, domain="mistral", plugin_namespace="mistral",
                                **({"aot": 1} if aot else {}), **attrs)

    nodes = [
        custom("SlidingWindowAttention", ["q", "k", "v", "past_key", "past_value", "past_len"], ["attn"],
               window=WINDOW, scale=float(D**-0.5)),
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
    pytest.importorskip("tensorrt")
    pytest.importorskip("polygraphy")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import mistral_export.plugins.tensorrt  # noqa: F401  (registers the plugins)
    from mistral_export.model.ops import rolling_cache_update_reference, sliding_window_attention_reference
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, TrtRunner

    path = tmp_path / "one_layer.onnx"
    one_layer_graph(path, dtype, aot)
    profile = Profile()
    for name, heads, seq_dim in (("q", HQ, True), ("k", HKV, True), ("v", HKV, True)):
        profile.add(name, min=(1, heads, 1, D), opt=(B, heads, 8, D), max=(4, heads, 64, D))
    for name in ("past_key", "past_value"):
        profile.add(name, min=(1, HKV, C, D), opt=(B, HKV, C, D), max=(4, HKV, C, D))
    profile.add("past_len", min=(1,), opt=(B,), max=(4,))
    build = EngineFromNetwork(NetworkFromOnnxPath(str(path), strongly_typed=True), CreateConfig(profiles=[profile]))

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
                feed["q"], feed["k"], feed["v"], feed["past_key"], feed["past_value"], feed["past_len"],
                WINDOW, D**-0.5).float()
            expected_key = rolling_cache_update_reference(feed["past_key"], feed["k"], feed["past_len"])
            outputs = runner.infer({n: t.numpy() for n, t in feed.items()})
            attn = torch.from_numpy(np.asarray(outputs["attn"])).float()
            rel = ((attn - expected_attn).abs().max() / expected_attn.abs().max()).item()
            assert rel <= tolerance, f"S={seq}: attention relative error {rel:.3g}"
            assert torch.equal(torch.from_numpy(np.asarray(outputs["present_key"])), expected_key)
