"""ONNX Runtime fusions for model.ort.onnx: fewer kernels per decode step.

At batch 1 a decode step pays several microseconds per kernel ONNX Runtime dispatches, so node count
matters as much as bytes. ONNX Runtime's own optimizer fuses RMSNorm, but not the residual Add before
it (the sum has a second consumer). This rewrite matches exactly what our exporter emits and leaves any
other shape alone: RMSNorm (Pow 2, ReduceMean last axis, Add eps, Sqrt, Div, Mul weight) →
SimplifiedLayerNormalization, or com.microsoft.SkipSimplifiedLayerNormalization when its input is a
residual Add (the fused node also returns the sum for the next residual). Attention, RoPE and the cache
update become GroupQueryAttention in onnxruntime_attention.py.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or isinstance(value.const_value, ir.ExternalTensor):
        return None
    return value.const_value.numpy()


def _only_producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    """The node of `op_type` producing `value`, if `value` feeds nothing else."""
    if value is None or len(value.uses()) != 1:
        return None
    node = value.producer()
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _last_axis(axis: int | None, rank: int | None) -> bool:
    return axis == -1 or (rank is not None and axis == rank - 1)


def _match_rms_norm(mul: ir.Node):
    """(x, weight, eps, pattern nodes) if `mul` ends weight * x / sqrt(mean(x^2, -1) + eps)."""
    if mul.op_type != "Mul" or mul.domain != "":
        return None
    for weight, normed in (mul.inputs, reversed(mul.inputs)):
        div = _only_producer(normed, "Div")
        if weight is None or not weight.is_initializer() or div is None:
            continue
        x, root = div.inputs
        sqrt = _only_producer(root, "Sqrt")
        add = sqrt and _only_producer(sqrt.inputs[0], "Add")
        if add is None:
            continue
        mean_value, eps_value = add.inputs if _constant(add.inputs[1]) is not None else reversed(add.inputs)
        eps = _constant(eps_value)
        mean = _only_producer(mean_value, "ReduceMean")
        if eps is None or eps.size != 1 or mean is None or mean.attributes.get_int("keepdims", 1) != 1:
            continue
        axes = _constant(mean.inputs[1]) if len(mean.inputs) > 1 else None
        rank = len(x.shape) if x.shape is not None else None
        if axes is None or axes.size != 1 or not _last_axis(int(axes.reshape(-1)[0]), rank):
            continue
        power = _only_producer(mean.inputs[0], "Pow")
        exponent = power and _constant(power.inputs[1])
        if power is None or power.inputs[0] is not x or exponent is None or exponent.size != 1 or exponent.item() != 2:
            continue
        return x, weight, float(eps.item()), [power, mean, add, sqrt, div, mul]
    return None


def fuse_rms_norms(model: ir.Model) -> int:
    graph = model.graph
    fused = 0
    for mul in list(graph):
        match = _match_rms_norm(mul)
        if match is None:
            continue
        x, weight, eps, pattern = match
        y = mul.outputs[0]
        residual = x.producer()
        others = [u for u in x.uses() if u.node not in pattern]
        if (
            residual is not None
            and residual.op_type == "Add"
            and residual.domain == ""
            and not x.is_graph_output()
            and all(v is not None and v.shape == x.shape for v in residual.inputs)
        ):
            outputs = [ir.Value(name=f"{y.name}_fused"), ir.Value(name=""), ir.Value(name="")]  # no mean, inv_std
            outputs.append(ir.Value(name=f"{x.name}_sum") if others else ir.Value(name=""))
            node = ir.node(
                "SkipSimplifiedLayerNormalization",
                [*residual.inputs, weight],
                {"epsilon": eps},
                domain=MS_DOMAIN,
                outputs=outputs,
            )
            anchor, removed = residual, [*pattern, residual]
            if others:
                outputs[3].shape, outputs[3].type = x.shape, x.type
                x.replace_all_uses_with(outputs[3])
        else:
            node = ir.node(
                "SimplifiedLayerNormalization",
                [x, weight],
                {"axis": -1, "epsilon": eps, "stash_type": 1},
                num_outputs=1,
            )
            anchor, removed = mul, pattern
        graph.insert_before(anchor, node)
        node.outputs[0].shape, node.outputs[0].type = y.shape, y.type
        y.replace_all_uses_with(node.outputs[0], replace_graph_outputs=True)
        graph.remove(removed, safe=True)
        fused += 1
    if fused:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return fused


def last_axis_slice(node: ir.Node | None):
    """(x, start, end) of a unit-step Slice of x's last axis with constant bounds."""
    if node is None or node.op_type != "Slice" or node.domain != "" or len(node.inputs) < 4:
        return None
    x = node.inputs[0]
    starts, ends, axes = (_constant(v) for v in node.inputs[1:4])
    steps = _constant(node.inputs[4]) if len(node.inputs) > 4 else np.ones(1)
    rank = len(x.shape) if x.shape is not None else None
    if any(a is None or a.size != 1 for a in (starts, ends, axes, steps)) or steps.item() != 1:
        return None
    if not _last_axis(int(axes.item()), rank):
        return None
    return x, int(starts.item()), int(ends.item())
