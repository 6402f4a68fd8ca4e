"""The ONNX Runtime artifact's attention: com.microsoft.GroupQueryAttention over a cache updated in place.

The portable bodies (export/functions.py) join each layer's cache with the chunk's keys before attention
and return the updated cache as a new `present` tensor (ScatterElements over a copy): two copies of every
layer's cache and some thirty small nodes per layer and step, more than half of a decode step's
non-GEMM time on CPU. ONNX Runtime's GroupQueryAttention does a layer's attention and cache update in
one kernel, in place when `present` is bound to the memory of `past_key_values` (the runner does that).

Its windowed cache (`sliding_window_cache=1`, ONNX Runtime >= 1.32) is not our ring: rows [0, L) hold
the L most recent positions in order, kept so as it evicts. With capacity C equal to
the window W (as our caches are), L = min(T, C) for T tokens, so the layout depends on T only until the
cache is full, and a step's attention depends only on relative positions once RoPE is applied. So:

- GQA is told past length min(past_len, C): the same layout and mask, and its int32 counters stay small
  at any position (positions reach op_contract.MAX_POSITION);
- GQA's rotary reads a table indexed by position, which cannot cover such positions, so it gets the
  exporter's own cos and sin of this step's absolute positions as a table of B*S rows (padded with C zero
  rows: the kernel wants at least as many rows as its past + S) and position_ids 0..B*S-1;
- `query_seqlens` = S for every sequence, so batched chunks at different positions are allowed.

Without a window (C = max context) the cache is linear (`sliding_window_cache=0`), token j in row j, and
a table would need C rows per step, so RoPE runs before the kernel (`com.microsoft.RotaryEmbedding` on q
and k, same table without the padding). The layout is the runner's business (cache_arrays/fill_cache move
whole caches); the op contract's meaning, attention over the cache before this chunk and only the last
min(S, C) rows kept, is the kernel's, and the parity tests check it against the eager model.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mistral_export.engines.onnxruntime.fusions import MS_DOMAIN, last_axis_slice
from mistral_export.export.precision.onnx_weights import add_initializer
from mistral_export.op_contract import ATTENTION_OP, CACHE_UPDATE_OP, DOMAIN, NO_WINDOW

CACHE_IN_PLACE_KEY = "mistral_export.cache_in_place"  # artifact metadata: present.* must alias past_key_values.*


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _only_use(value: ir.Value, op_type: str, ignored: tuple[ir.Node, ...] = ()) -> ir.Node | None:
    uses = [use for use in value.uses() if use.node not in ignored]
    node = uses[0].node if len(uses) == 1 else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _flat_heads(value: ir.Value) -> ir.Value | None:
    """x for value = Transpose(Reshape(x [B,S,H*D], [B,S,H,D]), perm 0,2,1,3) (the exporter's head split)."""
    transpose = _producer(value, "Transpose")
    if transpose is None or list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    flat = reshape.inputs[0] if reshape is not None else None
    return flat if flat is not None and flat.shape is not None and len(flat.shape) == 3 else None


def _without_cast(value: ir.Value) -> ir.Value:
    cast = _producer(value, "Cast")
    return cast.inputs[0] if cast is not None else value


def _table(value: ir.Value, negated: bool) -> ir.Value | None:
    """c for value = [Cast](Concat(c, c)), or s for [Cast](Concat(-s, s)) when `negated` (the exporter's RoPE tables)."""
    concat = _producer(_without_cast(value), "Concat")
    if concat is None or len(concat.inputs) != 2:
        return None
    first, second = concat.inputs
    if negated:
        neg = _producer(first, "Neg")
        first = neg.inputs[0] if neg is not None else None
    return second if first is second else None


def _rotate_half_of(value: ir.Value, x: ir.Value) -> bool:
    """value = Concat(x[..., D/2:], x[..., :D/2]) on the last axis."""
    concat = _producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or x.shape is None or not isinstance(x.shape[-1], int):
        return False
    half = x.shape[-1] // 2
    upper, lower = (last_axis_slice(v.producer()) for v in concat.inputs)
    return (
        upper is not None
        and lower is not None
        and upper[0] is x
        and lower[0] is x
        and upper[1] == half
        and upper[2] >= 2 * half
        and lower[1:] == (0, half)
    )


def _rope(value: ir.Value):
    """(x [B,S,H*D], cos [..,D/2], sin [..,D/2]) for value = x_t * COS + rotate_half(x_t) * SIN (x_t: x's heads)."""
    add = _producer(value, "Add")
    products = [_producer(v, "Mul") for v in add.inputs] if add is not None else [None]
    if None in products:
        return None
    for straight, rotated in (products, products[::-1]):
        for x_t, cos_table in (straight.inputs, straight.inputs[::-1]):
            for rot, sin_table in (rotated.inputs, rotated.inputs[::-1]):
                cos, sin, flat = _table(cos_table, False), _table(sin_table, True), _flat_heads(x_t)
                if cos is not None and sin is not None and flat is not None and _rotate_half_of(rot, x_t):
                    return flat, cos, sin
    return None


class _StepInputs:
    """Per-step inputs of the kernels, built once before the first layer and shared by all."""

    def __init__(
        self,
        graph: ir.Graph,
        anchor: ir.Node,
        past_len: ir.Value,
        cos: ir.Value,
        sin: ir.Value,
        capacity: int,
        dtype: ir.DataType,
        padded: bool,
    ):
        ids = graph.inputs[0]
        nodes: list[ir.Node] = []

        def add(op_type, inputs, attributes=None):
            nodes.append(ir.node(op_type, inputs, attributes or {}))
            return nodes[-1].outputs[0]

        def const(name, array):
            return add_initializer(graph, f"gqa_{name}", np.asarray(array))

        # position_ids 0..B*S-1 index a table of this step's B*S positions (the exporter's cos/sin, [B,1,S,D/2]).
        self.position_ids = add(
            "Reshape",
            [
                add("Range", [const("zero", np.int64(0)), add("Size", [ids]), const("one", np.int64(1))]),
                add("Shape", [ids]),
            ],
        )
        half = cos.shape[-1]
        table_shape = const("table_shape", np.array([-1, half], np.int64))
        self.cos, self.sin = (add("Reshape", [table, table_shape]) for table in (cos, sin))
        if cos.dtype != dtype:
            self.cos, self.sin = (add("Cast", [t], {"to": int(dtype)}) for t in (self.cos, self.sin))
        if padded:
            padding = const("table_padding", np.zeros((capacity, half), dtype=dtype.numpy()))
            self.cos, self.sin = (add("Concat", [t, padding], {"axis": 0}) for t in (self.cos, self.sin))
        seq = add("Shape", [ids], {"start": 1, "end": 2})  # [1]
        int32 = {"to": int(ir.DataType.INT32)}
        past = add("Min", [past_len, const("capacity", np.array([capacity], np.int64))])
        ends = add("Cast", [add("Add", [past, seq])], int32)  # [B] tokens after this step, as GQA counts them
        self.seqlens_k = add("Sub", [ends, const("one_int32", np.array([1], np.int32))])
        self.total = add("ReduceMax", [ends], {"keepdims": 0})
        self.query_seqlens = add("Cast", [add("Expand", [seq, add("Shape", [past_len])])], int32)
        for node in nodes:
            graph.insert_before(anchor, node)


def _packed_qkv(q: ir.Value, k: ir.Value, v: ir.Value) -> ir.Value | None:
    """qkv for q, k, v = Split(qkv) on the last axis, in that order (the exporter's fused projection)."""
    split = q.producer()
    if split is None or split.op_type != "Split" or split.domain != "" or list(split.outputs) != [q, k, v]:
        return None
    return split.inputs[0]


def use_group_query_attention(model: ir.Model) -> int:
    """Each SlidingWindowAttention and its two RollingCacheUpdates → one GroupQueryAttention.

    Runs on the exported graph, before the bodies are inlined; returns the number of layers rewritten.
    Raises RuntimeError if the exporter's graph around the attention is not in the form matched here.
    """
    graph = model.graph
    updates = {(n.inputs[0], n.inputs[1]): n for n in graph if n.domain == DOMAIN and n.op_type == CACHE_UPDATE_OP}
    step: _StepInputs | None = None
    rewritten = 0
    for node in list(graph):
        if node.domain != DOMAIN or node.op_type != ATTENTION_OP:
            continue
        q, k, v, k_cache, v_cache, past_len = node.inputs
        rope_q, rope_k, v_flat = _rope(q), _rope(k), _flat_heads(v)
        update_k, update_v = updates.get((k_cache, k)), updates.get((v_cache, v))
        transpose = _only_use(node.outputs[0], "Transpose", ignored=(update_k, update_v))  # they only order
        merge = _only_use(transpose.outputs[0], "Reshape") if transpose is not None else None  # to [B,S,Hq*D]
        if (
            None in (rope_q, rope_k, v_flat, update_k, update_v, merge)
            or rope_q[1:] != rope_k[1:]
            or list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]
        ):
            raise RuntimeError(f"{node.name}: the graph around the attention is not the exporter's form")
        qkv = _packed_qkv(rope_q[0], rope_k[0], v_flat)
        heads, kv_heads, capacity, head_dim = q.shape[1], k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
        window = node.attributes.get_int("window", NO_WINDOW)
        windowed = window != NO_WINDOW
        if windowed and (window != capacity or qkv is None):
            raise RuntimeError(
                f"{node.name}: window {window} with cache capacity {capacity}, or q/k/v not one "
                f"projection: GroupQueryAttention's windowed cache is used with capacity = window"
            )
        if step is None:
            step = _StepInputs(graph, node, past_len, rope_q[1], rope_q[2], capacity, q.dtype, padded=windowed)
        if windowed:
            inputs = [
                qkv,
                None,
                None,
                k_cache,
                v_cache,
                step.seqlens_k,
                step.total,
                step.cos,
                step.sin,
                step.position_ids,
            ]
        else:
            rotated = [
                ir.node(
                    "RotaryEmbedding",
                    [flat, step.position_ids, step.cos, step.sin],
                    {"num_heads": count, "rotary_embedding_dim": head_dim},
                    domain=MS_DOMAIN,
                )
                for flat, count in ((rope_q[0], heads), (rope_k[0], kv_heads))
            ]
            graph.insert_before(node, rotated)
            inputs = [
                *(r.outputs[0] for r in rotated),
                v_flat,
                k_cache,
                v_cache,
                step.seqlens_k,
                step.total,
                None,
                None,
                None,
            ]
        gqa = ir.node(
            "GroupQueryAttention",
            [*inputs, *[None] * 6, step.query_seqlens],
            {
                "num_heads": heads,
                "kv_num_heads": kv_heads,
                "scale": node.attributes.get_float("scale"),
                "local_window_size": window if windowed else -1,
                "sliding_window_cache": int(windowed),
                "do_rotary": int(windowed),
            },
            domain=MS_DOMAIN,
            num_outputs=3,
        )
        graph.insert_before(node, gqa)
        out = gqa.outputs[0]  # [B,S,Hq*D]: what the Transpose and Reshape after the attention made
        out.type, out.shape = merge.outputs[0].type, merge.outputs[0].shape
        merge.outputs[0].replace_all_uses_with(out)
        names = []
        for update, present in ((update_k, gqa.outputs[1]), (update_v, gqa.outputs[2])):
            old = update.outputs[0]
            present.type, present.shape = old.type, old.shape
            old.replace_all_uses_with(present, replace_graph_outputs=True)
            names.append(old.name)
        graph.remove([merge, transpose, update_k, update_v, node], safe=True)
        gqa.outputs[1].name, gqa.outputs[2].name = names
        rewritten += 1
    if rewritten:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        model.metadata_props[CACHE_IN_PLACE_KEY] = "1"
    return rewritten
