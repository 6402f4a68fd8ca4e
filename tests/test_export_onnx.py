"""The exported graph: contract (I/O, `mistral` nodes, function bodies), checker, and fp32 parity with eager."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mistral_export.engines.onnxruntime.attention import CACHE_IN_PLACE_KEY
from mistral_export.errors import MistralExportError
from mistral_export.export.onnx_export import check_model, export_onnx, input_names, output_names
from mistral_export.model.checkpoint import random_model, save_hf_checkpoint
from mistral_export.model.config import TINY_DIR, ModelConfig
from mistral_export.op_contract import MAX_POSITION
from mistral_export.runners.base import EagerRunner, greedy_tokens, prefill
from mistral_export.runners.onnxruntime import OnnxRuntimeRunner

from conftest import export_for_onnxruntime, small_config

TOLERANCE = 1e-4  # fp32 bar of DESIGN.md


def export_config(window: int | None, layers: int = 2) -> ModelConfig:
    return small_config(heads=8, kv_heads=2, window=window, layers=layers, hidden=128, intermediate=192, max_context=64)


CONFIGS = {"w16": export_config(16), "w37": export_config(37), "nowindow": export_config(None)}


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    """(eager model, model.onnx path), exported once per config per session."""
    model = random_model(CONFIGS[request.param], seed=3)
    path = export_for_onnxruntime(model, tmp_path_factory.mktemp(request.param))
    return model, path


def length_for(config: ModelConfig) -> int:
    """3W+5 tokens (the ring wraps three times); without a window, as much as the linear cache holds."""
    return 3 * config.sliding_window + 5 if config.sliding_window else config.cache_capacity


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_graph_contract(exported):
    model, path = exported
    config = model.config
    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    assert [i.name for i in graph.input] == input_names(config.num_layers)
    assert [o.name for o in graph.output] == output_names(config.num_layers)

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    ins = {i.name: i for i in graph.input}
    outs = {o.name: o for o in graph.output}
    assert dims(ins["input_ids"]) == ["batch", "sequence"]
    assert ins["input_ids"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert dims(ins["past_len"]) == ["batch"]
    assert ins["past_len"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    cache = ["batch", config.num_kv_heads, config.cache_capacity, config.head_dim]
    for i in range(config.num_layers):
        for kind in ("key", "value"):
            assert dims(ins[f"past_key_values.{i}.{kind}"]) == cache
            assert dims(outs[f"present.{i}.{kind}"]) == cache
    assert dims(outs["logits"]) == ["batch", "sequence", config.vocab_size]

    custom = [n for n in graph.node if n.domain == "mistral"]
    assert sorted({n.op_type for n in custom}) == ["RollingCacheUpdate", "SlidingWindowAttention"]
    assert len(custom) == 3 * config.num_layers
    for node in custom:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"mistral"
        assert attrs["aot"] == 1  # TensorRT binds the ahead-of-time plugin implementation by default
        if node.op_type == "SlidingWindowAttention":
            assert attrs["window"] == (config.sliding_window or 0)
            assert attrs["scale"] == pytest.approx(config.head_dim**-0.5)
        else:  # the ordering input is the attention output of the same layer
            assert len(node.input) == 4
    assert {(f.domain, f.name) for f in proto.functions} == {
        ("mistral", "SlidingWindowAttention"),
        ("mistral", "RollingCacheUpdate"),
    }
    assert {o.domain: o.version for o in proto.opset_import}["mistral"] == 1
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["mistral_export.cache_capacity"] == str(config.cache_capacity)
    assert meta["mistral_export.cache_wraps"] == ("1" if config.sliding_window else "0")
    # Weights are external data, none inline.
    big = [t for t in graph.initializer if np.prod(t.dims) > 1024]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    check_model(path)  # onnx.checker full check + strict shape inference


def test_graph_is_lean(exported):
    """No per-layer shape arithmetic: only Reshapes with constant targets, rotary computed once."""
    model, path = exported
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Shape") <= 1 and ops.count("Cos") == 1 and ops.count("Sin") == 1
    initializers = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Reshape":
            assert node.input[1] in initializers
    # Per layer wq+wk+wv, wo, w1+w3 and w2 (projections of one activation share a MatMul), then lm_head.
    weight_matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    assert len(weight_matmuls) == 4 * model.config.num_layers + 1
    # Position/rotary setup once at the top (Shape, Squeeze, Range, 3 Unsqueeze, 2 Concat for the cos and
    # signed-sin halves) and the embedding Gather; none of these repeat per layer.
    shape_ops = [
        op
        for op in ops
        if op in {"Shape", "Squeeze", "Unsqueeze", "Range", "Gather", "Size", "ConstantOfShape", "Expand", "Concat"}
    ]
    rotate_half_concats = 2 * model.config.num_layers
    assert len(shape_ops) - rotate_half_concats <= 9, shape_ops


def test_loads_in_plain_onnxruntime(exported):
    """No custom-op library: ORT runs model.onnx as exported, the `mistral` nodes from their bodies."""
    model, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()][:2] == ["input_ids", "past_len"]
    config = model.config
    ids = torch.randint(
        0, config.vocab_size, (2, 2 * (config.sliding_window or 16) + 3), generator=torch.Generator().manual_seed(5)
    )
    eager = EagerRunner(model)
    raw = OnnxRuntimeRunner(path, threads=1, portable=True)
    for runner in (eager, raw):
        runner.reset(2)
    window = config.sliding_window or 16
    assert max_diff(prefill(raw, ids, window), prefill(eager, ids, window)) <= TOLERANCE


def test_runtime_artifact_is_lean(exported):
    """model.ort.onnx: per layer one GroupQueryAttention updating the cache in place, the projections and the
    fused norms; positions, RoPE tables and the kernels' lengths computed once for all layers."""
    model, path = exported
    runner = OnnxRuntimeRunner(path, threads=1)
    assert runner.session_path.name == "model.ort.onnx"
    proto = onnx.load(str(runner.session_path), load_external_data=False)
    assert {p.key: p.value for p in proto.metadata_props}[CACHE_IN_PLACE_KEY] == "1"
    ops = Counter(n.op_type for n in proto.graph.node)
    layers, window = model.config.num_layers, model.config.sliding_window
    assert not proto.functions and not {
        "SlidingWindowAttention",
        "RollingCacheUpdate",
        "ScatterElements",
        "Softmax",
        "Transpose",
    } & set(ops)
    attention = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == layers
    for node in attention:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["local_window_size"] == (window or -1) and attrs["sliding_window_cache"] == int(bool(window))
        assert attrs["do_rotary"] == int(bool(window))  # without a window RoPE runs before it (RotaryEmbedding)
    assert ops["RotaryEmbedding"] == (0 if window else 2 * layers)
    # Once per step: positions, cos and sin, GQA's lengths; no per-layer shape arithmetic.
    assert ops["Cos"] == ops["Sin"] == ops["ReduceMax"] == ops["Min"] == 1 and ops["Shape"] <= 3
    # Fusions (engines/onnxruntime/fusions.py): every norm but the first follows a residual Add and takes it in.
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers and ops["SimplifiedLayerNormalization"] == 1
    assert "Pow" not in ops and "Sqrt" not in ops
    # Per layer: 2 norms, 4 projections, the attention, SwiGLU's Split, Sigmoid and 2 Muls (+ Split and 2 RoPE).
    per_layer = 11 if window else 14
    assert len(proto.graph.node) - per_layer * layers <= 30


def test_prefill_decode_and_chunked_match_eager(exported):
    model, path = exported
    config = model.config
    length = length_for(config)
    ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(7))
    eager = EagerRunner(model)
    eager.reset(1)
    reference = prefill(eager, ids)  # one chunk, eager
    runner = OnnxRuntimeRunner(path, threads=1)
    window = config.sliding_window or 16
    for chunk in (None, 1, window - 3, window + 5):
        runner.reset(1)
        got = prefill(runner, ids, chunk)
        assert got.shape == reference.shape
        assert max_diff(got, reference) <= TOLERANCE, f"chunk {chunk}"


def test_batched_decode_at_different_positions(exported):
    """Batch of 2 whose sequences sit at different past_len (each prefilled alone, caches stacked)."""
    model, path = exported
    config = model.config
    window = config.sliding_window or 16
    g = torch.Generator().manual_seed(11)
    long_len, short_len = (3 * window + 5, window + 3) if config.sliding_window else (40, 17)
    steps = window + 2 if config.sliding_window else config.cache_capacity - long_len
    a = torch.randint(0, config.vocab_size, (1, long_len + steps), generator=g)
    b = torch.randint(0, config.vocab_size, (1, short_len + steps), generator=g)

    eager_caches = []
    for seq, length in ((a, long_len), (b, short_len)):
        solo = EagerRunner(model)
        solo.reset(1)
        prefill(solo, seq[:, :length])
        eager_caches.append(solo.cache)
    eager = EagerRunner(model)
    eager.reset(2)
    eager.cache = [
        tuple(torch.cat([eager_caches[0][i][j], eager_caches[1][i][j]]) for j in range(2))
        for i in range(config.num_layers)
    ]

    ort_caches = []
    for seq, length in ((a, long_len), (b, short_len)):
        solo = OnnxRuntimeRunner(path, threads=1)
        solo.reset(1)
        prefill(solo, seq[:, :length], chunk_size=window)
        ort_caches.append(solo.cache_arrays())
    runner = OnnxRuntimeRunner(path, threads=1)
    runner.reset(2)
    runner.fill_cache(
        [
            tuple(np.concatenate([ort_caches[0][i][j], ort_caches[1][i][j]]) for j in range(2))
            for i in range(config.num_layers)
        ]
    )

    results = []
    for backend in (eager, runner):
        logits = []
        for t in range(steps):
            tokens = torch.cat([a[:, long_len + t : long_len + t + 1], b[:, short_len + t : short_len + t + 1]])
            logits.append(backend.step(tokens, torch.tensor([long_len + t, short_len + t])))
        results.append(torch.cat(logits, dim=1))
    assert max_diff(results[0], results[1]) <= TOLERANCE
    # And each batched row equals that sequence alone, prefilled in one chunk by eager.
    solo = EagerRunner(model)
    for row, seq, start in ((0, a, long_len), (1, b, short_len)):
        solo.reset(1)
        alone = prefill(solo, seq)[:, start:]
        assert max_diff(results[1][row : row + 1], alone) <= TOLERANCE


def test_windowless_cache_overflow_is_a_clear_error(tmp_path_factory):
    config = CONFIGS["nowindow"]
    path = None
    for candidate in tmp_path_factory.getbasetemp().glob("nowindow*/model.onnx"):
        path = candidate
    if path is None:
        path = export_for_onnxruntime(random_model(config), tmp_path_factory.mktemp("nowindow-overflow"))
    runner = OnnxRuntimeRunner(path, threads=1)
    runner.reset(1)
    runner.step(torch.zeros(1, 60, dtype=torch.int64), torch.tensor([0]))
    with pytest.raises(MistralExportError, match="exceeds the cache capacity 64"):
        runner.step(torch.zeros(1, 5, dtype=torch.int64), torch.tensor([60]))


def test_last_token_logits_option(tmp_path):
    config = export_config(16, layers=1)
    model = random_model(config, seed=5)
    path = export_for_onnxruntime(model, tmp_path, last_token_logits=True)
    proto = onnx.load(str(path), load_external_data=False)
    logits = next(o for o in proto.graph.output if o.name == "logits")
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["batch", 1, 97]
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(2))
    eager = EagerRunner(model)
    eager.reset(2)
    expected = eager.step(ids, torch.tensor([0, 0]))[:, -1:]
    runner = OnnxRuntimeRunner(path, threads=1)
    runner.reset(2)
    assert max_diff(runner.step(ids, torch.tensor([0, 0])), expected) <= TOLERANCE


def test_export_from_checkpoint_folder_streams_weights(tmp_path):
    config = export_config(16, layers=1)
    model = random_model(config, seed=9)
    save_hf_checkpoint(model, tmp_path / "ckpt", dtype=torch.bfloat16)
    path = export_for_onnxruntime(tmp_path / "ckpt", tmp_path / "onnx")
    assert (tmp_path / "onnx" / "model.onnx.data").exists()
    from mistral_export.model.checkpoint import load_model

    bf16_model = load_model(tmp_path / "ckpt")  # fp32 eager model of the bf16 weights
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    eager = EagerRunner(bf16_model)
    eager.reset(1)
    runner = OnnxRuntimeRunner(path, threads=1)
    runner.reset(1)
    assert max_diff(runner.step(ids, torch.tensor([0])), eager.step(ids, torch.tensor([0]))) <= TOLERANCE


def test_user_errors_are_clear(tmp_path):
    with pytest.raises(MistralExportError, match="opset"):
        export_onnx(random_model(export_config(16, layers=1)), tmp_path, opset=9)
    with pytest.raises(MistralExportError, match="shapes only"):
        export_onnx("mistral-7b-v0.1", tmp_path)
    with pytest.raises(MistralExportError, match="no ONNX Runtime artifact here"):
        OnnxRuntimeRunner(tmp_path / "missing.onnx")


FIXTURE = Path(TINY_DIR) / "model.safetensors"


@pytest.mark.skipif(not FIXTURE.exists(), reason="tiny fixture not trained yet (mistral_export/model/fixtures/tiny)")
def test_fixture_parity_and_greedy_generation(tmp_path):
    from mistral_export.model.checkpoint import load_model

    model = load_model("tiny")
    config = model.config
    path = export_for_onnxruntime("tiny", tmp_path)
    window = config.sliding_window
    runner = OnnxRuntimeRunner(path, threads=2)
    eager = EagerRunner(model)
    ids = torch.randint(3, config.vocab_size, (1, 3 * window + 5), generator=torch.Generator().manual_seed(0))
    eager.reset(1)
    reference = prefill(eager, ids)
    for chunk in (None, 1, window - 3, window + 5):
        runner.reset(1)
        assert max_diff(prefill(runner, ids, chunk), reference) <= TOLERANCE, f"chunk {chunk}"
    prompt = ids[0, :12].tolist()
    expected = list(greedy_tokens(eager, prompt, 4 * window))
    assert list(greedy_tokens(runner, prompt, 4 * window)) == expected


def test_jit_plugin_impl_is_written_and_onnxruntime_ignores_it(tmp_path):
    model = random_model(export_config(16, layers=1), seed=2)
    path = export_for_onnxruntime(model, tmp_path, plugin_impl="jit")
    nodes = [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.domain == "mistral"]
    assert nodes and all(onnx.helper.get_attribute_value(a) == 0 for n in nodes for a in n.attribute if a.name == "aot")
    assert all(any(a.name == "aot" for a in n.attribute) for n in nodes)
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    eager = EagerRunner(model)
    for runner in (eager, OnnxRuntimeRunner(path, threads=1), OnnxRuntimeRunner(path, threads=1, portable=True)):
        runner.reset(1)
        got = prefill(runner, ids, 7)
        if runner is eager:
            expected = got
        assert max_diff(got, expected) <= TOLERANCE
    with pytest.raises(MistralExportError, match="--plugin-impl must be one of aot, jit"):
        export_onnx(model, tmp_path / "bad", plugin_impl="fast")


def test_runner_only_reads_the_artifact(tmp_path):
    """A missing or stale model.ort.onnx is an error naming the command that writes it; the runner writes nothing."""
    model = random_model(export_config(16, layers=1), seed=4)
    path = export_onnx(model, tmp_path)
    with pytest.raises(MistralExportError, match="no ONNX Runtime artifact.*mistral-export export"):
        OnnxRuntimeRunner(path)
    assert not (tmp_path / "model.ort.onnx").exists()
    export_for_onnxruntime(model, tmp_path)
    described = (tmp_path / "artifact.json").read_text()
    export_onnx(random_model(export_config(16, layers=1), seed=5), tmp_path, last_token_logits=True)
    with pytest.raises(MistralExportError, match="no ONNX Runtime artifact.*mistral-export export"):
        OnnxRuntimeRunner(path)  # a new model.onnx took its artifact's description with it
    export_for_onnxruntime(model, tmp_path, last_token_logits=True)
    (tmp_path / "artifact.json").write_text(described)  # a description of another model.onnx than the artifact's
    with pytest.raises(MistralExportError, match="stale.*mistral-export export"):
        OnnxRuntimeRunner(path)


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_positions_past_the_last_exact_one_are_refused_by_every_runner(exported, backend):
    model, path = exported
    runner = EagerRunner(model) if backend == "eager" else OnnxRuntimeRunner(path, threads=1)
    runner.reset(1)
    last = MAX_POSITION
    if model.config.sliding_window:  # a ring may reach the last position, not pass it
        assert torch.isfinite(runner.step(torch.zeros(1, 1, dtype=torch.int64), torch.tensor([last]))).all()
        expected = "past the last position rotary embeddings compute exactly"
    else:  # a linear cache stops at its capacity long before
        expected = "exceeds the cache capacity"
    with pytest.raises(MistralExportError, match=expected):
        runner.step(torch.zeros(1, 2, dtype=torch.int64), torch.tensor([last]))
