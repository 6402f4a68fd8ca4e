"""ONNX function bodies of the `mistral` ops (domain `mistral`, version 1), in standard ONNX ops.

The exported model carries these as model-local functions, so ONNX Runtime (or any runtime)
executes the graph with no custom-op library, while TensorRT binds the nodes to its plugins via
their `plugin_namespace` attribute. The meaning is that of `mistral_export.model.ops`; the tests
compare these bodies with `sliding_window_attention_reference` / `rolling_cache_update_reference`.
"""

from __future__ import annotations

import onnx
from onnxscript import FLOAT, INT64, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from mistral_export.op_contract import DOMAIN, NO_WINDOW, VERSION

mistral = Opset(DOMAIN, VERSION)


@script(mistral, default_opset=op)
def SlidingWindowAttention(q, k, v, k_cache, v_cache, past_len: INT64, window: int, scale: float):
    """q [B,Hq,S,D], k/v [B,Hkv,S,D], caches [B,Hkv,C,D] (before this chunk), past_len [B] → [B,Hq,S,D]."""
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    one_1d = op.Constant(value_ints=[1])
    seq = op.Shape(q, start=2, end=3)  # [1]
    capacity = op.Shape(k_cache, start=2, end=3)  # [1]
    kv_heads = op.Shape(k, start=1, end=2)  # [1]

    # Absolute positions: new rows past_len + i, cache slot s holds last - ((last - s) mod C).
    start = op.Unsqueeze(past_len, [1])  # [B,1]
    new_pos = op.Add(start, op.Range(zero, op.Squeeze(seq, [0]), one))  # [B,S]
    last = op.Sub(start, one)
    slots = op.Range(zero, op.Squeeze(capacity, [0]), one)  # [C]
    old_pos = op.Sub(last, op.Mod(op.Sub(last, slots), capacity))  # [B,C], negative = empty slot
    key_pos = op.Unsqueeze(op.Concat(old_pos, new_pos, axis=1), [1])  # [B,1,K]
    query_pos = op.Unsqueeze(new_pos, [2])  # [B,S,1]

    win = op.Constant(value_int=window)
    in_window = op.Or(op.Equal(win, op.Constant(value_int=NO_WINDOW)), op.Greater(key_pos, op.Sub(query_pos, win)))
    allowed = op.And(op.GreaterOrEqual(key_pos, zero), op.LessOrEqual(key_pos, query_pos))
    allowed = op.And(allowed, in_window)  # [B,S,K]

    # fp32 accumulation whatever the I/O type; GQA by grouping query heads per kv head:
    # q [B,Hq,S,D] → [B,Hkv,G*S,D], row g*S+s is query head kv*G+g at position s.
    group = op.Div(op.Shape(q, start=1, end=2), kv_heads)
    rows_mask = op.Tile(op.Unsqueeze(allowed, [1]), op.Concat(one_1d, one_1d, group, one_1d, axis=0))  # [B,1,G*S,K]
    keys = op.Concat(op.Cast(k_cache, to=FLOAT.dtype), op.Cast(k, to=FLOAT.dtype), axis=2)  # [B,Hkv,K,D]
    values = op.Concat(op.Cast(v_cache, to=FLOAT.dtype), op.Cast(v, to=FLOAT.dtype), axis=2)
    keep = op.Constant(value_ints=[0])
    grouped = op.Reshape(
        op.Cast(q, to=FLOAT.dtype), op.Concat(keep, kv_heads, op.Constant(value_ints=[-1]), keep, axis=0)
    )
    scores = op.Mul(op.MatMul(grouped, op.Transpose(keys, perm=[0, 1, 3, 2])), op.Constant(value_float=scale))
    # Additive mask: built once from rows_mask, it is shared by every layer once the bodies are inlined.
    bias = op.Where(rows_mask, op.Constant(value_float=0.0), op.Constant(value_float=float("-inf")))
    out = op.Reshape(op.MatMul(op.Softmax(op.Add(scores, bias), axis=-1), values), op.Shape(q))
    return op.CastLike(out, q)


@script(mistral, default_opset=op)
def RollingCacheUpdate(cache, new, past_len: INT64, after):
    """cache [B,Hkv,C,D] with slot (past_len + i) mod C ← new[:, :, i] for the last min(S, C) rows."""
    zero = op.Constant(value_ints=[0])
    seq = op.Shape(new, start=2, end=3)
    capacity = op.Shape(cache, start=2, end=3)
    first = op.Max(op.Sub(seq, capacity), zero)  # [1]
    rows = op.Range(op.Squeeze(first, [0]), op.Squeeze(seq, [0]), op.Constant(value_int=1))  # [n]
    slots = op.Mod(op.Add(op.Unsqueeze(past_len, [1]), rows), capacity)  # [B,n]
    update = op.CastLike(op.Slice(new, first, seq, op.Constant(value_ints=[2])), cache)  # [B,Hkv,n,D]
    # Index shape from shapes that do not depend on the sliced data (shared across layers once inlined).
    index_shape = op.Concat(op.Shape(new, start=0, end=2), op.Shape(rows), op.Shape(new, start=3, end=4), axis=0)
    index = op.Expand(op.Unsqueeze(slots, [1, 3]), index_shape)
    return op.ScatterElements(cache, index, update, axis=2)


def function_protos(opset: int) -> list[onnx.FunctionProto]:
    """Both bodies as FunctionProtos whose default-domain opset import is the model's `opset`."""
    protos = []
    for fn in (SlidingWindowAttention, RollingCacheUpdate):
        proto = fn.to_function_proto()
        for entry in proto.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = opset
        protos.append(proto)
    return protos
