"""The ONNX function bodies of the `mistral` ops match the torch reference (ops.py) on ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from mistral_export.export.functions import function_protos
from mistral_export.model.ops import rolling_cache_update_reference, sliding_window_attention_reference

OPSET = 20


def _session(op_type: str, inputs: list[tuple[str, int]], attrs: dict, elem: int = TensorProto.FLOAT):
    """A model made of one call of the `mistral` function, run by plain ONNX Runtime."""
    value_infos = [
        helper.make_tensor_value_info(name, dtype, [f"{name}_{i}" for i in range(rank)]) for name, dtype, rank in inputs
    ]
    node = helper.make_node(
        op_type, [name for name, _, _ in inputs], ["out"], domain="mistral", plugin_namespace="mistral", **attrs
    )
    out = helper.make_tensor_value_info("out", elem, ["o0", "o1", "o2", "o3"])
    graph = helper.make_graph([node], op_type, value_infos, [out])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("mistral", 1)],
        functions=function_protos(OPSET),
    )
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _swa_session(window: int, scale: float, elem=TensorProto.FLOAT):
    names = [
        ("q", elem, 4),
        ("k", elem, 4),
        ("v", elem, 4),
        ("k_cache", elem, 4),
        ("v_cache", elem, 4),
        ("past_len", TensorProto.INT64, 1),
    ]
    return _session("SlidingWindowAttention", names, {"window": window, "scale": scale}, elem)


CASES = [
    # (window, capacity, seq, past_len per sequence): decode, wrap-around, chunk > W, fresh start
    pytest.param(16, 16, 1, [5, 40], id="decode-wrap"),
    pytest.param(16, 16, 7, [0, 13], id="chunk<W"),
    pytest.param(16, 16, 40, [3, 50], id="chunk>W"),
    pytest.param(37, 37, 1, [0, 100], id="W37-decode"),
    pytest.param(37, 37, 45, [37, 81], id="W37-chunk>W"),
    pytest.param(0, 64, 5, [2, 59], id="no-window"),
    pytest.param(0, 64, 1, [0, 63], id="no-window-decode"),
]


@pytest.mark.parametrize("window,capacity,seq,past", CASES)
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa4", "mha"])
def test_sliding_window_attention_body_matches_reference(window, capacity, seq, past, heads):
    q_heads, kv_heads = heads
    g = torch.Generator().manual_seed(window * 1000 + seq)
    batch, dim = 2, 32
    q = torch.randn(batch, q_heads, seq, dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, seq, dim, generator=g) for _ in range(2))
    k_cache, v_cache = (torch.randn(batch, kv_heads, capacity, dim, generator=g) for _ in range(2))
    past_len = torch.tensor(past)
    scale = dim**-0.5
    expected = sliding_window_attention_reference(q, k, v, k_cache, v_cache, past_len, window, scale)
    feeds = dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, past_len=past_len)
    (out,) = _swa_session(window, scale).run(None, {n: t.numpy() for n, t in feeds.items()})
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-5, rtol=0)


def test_sliding_window_attention_body_fp16_io_accumulates_in_fp32():
    """fp16 I/O: the body computes in fp32 and rounds once, so it is within one fp16 ulp of the reference (which
    does the same; only the fp32 summation order differs). A body computing in fp16 is off by several ulps."""
    g = torch.Generator().manual_seed(1)
    q = (3 * torch.randn(2, 8, 5, 32, generator=g)).half()
    k, v = ((3 * torch.randn(2, 2, 5, 32, generator=g)).half() for _ in range(2))
    kc, vc = ((3 * torch.randn(2, 2, 16, 32, generator=g)).half() for _ in range(2))
    past_len = torch.tensor([20, 9])
    expected = sliding_window_attention_reference(q, k, v, kc, vc, past_len, 16, 32**-0.5).numpy()
    sess = _swa_session(16, 32**-0.5, TensorProto.FLOAT16)
    (out,) = sess.run(
        None,
        {
            "q": q.numpy(),
            "k": k.numpy(),
            "v": v.numpy(),
            "k_cache": kc.numpy(),
            "v_cache": vc.numpy(),
            "past_len": past_len.numpy(),
        },
    )
    assert out.dtype == np.float16
    ulps = np.abs(out.astype(np.float32) - expected.astype(np.float32)) / np.spacing(np.abs(expected))
    assert ulps.max() <= 1, f"{ulps.max():.0f} fp16 ulps from the reference"


@pytest.mark.parametrize(
    "capacity,seq,past",
    [
        pytest.param(16, 1, [0, 15], id="decode-last-slot"),
        pytest.param(16, 1, [16, 33], id="decode-wrap"),
        pytest.param(16, 5, [14, 3], id="chunk-wraps"),
        pytest.param(16, 40, [0, 7], id="chunk>C-keeps-last-C"),
        pytest.param(16, 16, [5, 0], id="chunk=C"),
    ],
)
def test_rolling_cache_update_body_matches_reference(capacity, seq, past):
    g = torch.Generator().manual_seed(seq)
    cache = torch.randn(2, 2, capacity, 8, generator=g)
    new = torch.randn(2, 2, seq, 8, generator=g)
    after = torch.randn(2, 4, seq, 8, generator=g)
    past_len = torch.tensor(past)
    expected = rolling_cache_update_reference(cache, new, past_len)
    f = TensorProto.FLOAT
    sess = _session(
        "RollingCacheUpdate", [("cache", f, 4), ("new", f, 4), ("past_len", TensorProto.INT64, 1), ("after", f, 4)], {}
    )
    (out,) = sess.run(
        None, {"cache": cache.numpy(), "new": new.numpy(), "past_len": past_len.numpy(), "after": after.numpy()}
    )
    np.testing.assert_array_equal(out, expected.numpy())


def _scatter_indices(capacity: int, seq: int, past: list[int]) -> np.ndarray:
    """The index input of the RollingCacheUpdate body's ScatterElements, evaluated by ONNX Runtime."""
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info(n, t, None)
        for n, t in (("cache", f), ("new", f), ("past_len", TensorProto.INT64), ("after", f))
    ]
    node = helper.make_node("RollingCacheUpdate", [i.name for i in inputs], ["out"], domain="mistral")
    graph = helper.make_graph([node], "update", inputs, [helper.make_tensor_value_info("out", f, None)])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("mistral", 1)],
        functions=function_protos(OPSET),
    )
    model = onnx.inliner.inline_local_functions(model)
    (scatter,) = [n for n in model.graph.node if n.op_type == "ScatterElements"]
    model.graph.output.append(helper.make_tensor_value_info(scatter.input[1], TensorProto.INT64, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {
        "cache": np.zeros((2, 2, capacity, 4), np.float32),
        "new": np.zeros((2, 2, seq, 4), np.float32),
        "past_len": np.array(past, np.int64),
        "after": np.zeros((2, 4, seq, 4), np.float32),
    }
    return sess.run([scatter.input[1]], feeds)[0]


@pytest.mark.parametrize(
    "capacity,seq,past",
    [(16, 40, [0, 7]), (16, 16, [5, 0]), (16, 5, [14, 3])],
    ids=["chunk>C", "chunk=C", "chunk<C-wraps"],
)
def test_rolling_cache_update_body_scatters_each_slot_once(capacity, seq, past):
    """ScatterElements with a repeated index is undefined in ONNX (a runtime may keep either write): the body
    scatters only the last min(S, C) rows, so each slot appears at most once per (b, h, d)."""
    index = _scatter_indices(capacity, seq, past)
    assert index.shape[2] == min(seq, capacity)
    assert (np.diff(np.sort(index, axis=2), axis=2) > 0).all()


def test_function_protos_follow_model_opset():
    for opset in (18, 20, 23):
        for proto in function_protos(opset):
            assert proto.domain == "mistral"
            assert {e.domain: e.version for e in proto.opset_import}[""] == opset
