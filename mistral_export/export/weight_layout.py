"""How checkpoint tensors become the graph's weight initializers: names, MatMul layout, fusion.

The traced graph holds the model's parameters as initializers under the wrapper's names. Here they
get the model's own names, a Transpose feeding MatMul becomes an initializer stored transposed
(`<name>.T`), and MatMuls that read one activation share one initializer holding their weights side
by side. Nothing is read: initializers stay `Placeholder`s until the weights are streamed, and the
result says which checkpoint tensors fill each initializer.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


class Placeholder(ir.Tensor):
    """Shape and dtype of a weight not yet bound; reading it is a bug."""

    def __init__(self, name: str, dtype: ir.DataType, shape: tuple[int, ...]):
        super().__init__(np.zeros((0,), dtype=dtype.numpy()), dtype=dtype, shape=ir.Shape(shape), name=name)

    def numpy(self):
        raise RuntimeError(f"weight {self.name} read before it was bound")

    def tobytes(self):
        raise RuntimeError(f"weight {self.name} read before it was bound")


def strip_wrapper_prefix(model: ir.Model) -> None:
    """Initializers named as the model's own state dict (the `_Flat` wrapper prefixes "model.")."""
    graph = model.graph
    for name, value in list(graph.initializers.items()):
        if name.startswith("model."):
            graph.initializers.pop(name)
            value.name = name.removeprefix("model.")
            graph.register_initializer(value)


def fold_weight_transposes(model: ir.Model, params: set[str]) -> dict[str, tuple[str, bool]]:
    """Transpose(W) feeding MatMul → an initializer stored transposed. Returns init → (source, transposed)."""
    graph = model.graph
    sources: dict[str, tuple[str, bool]] = {}
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain != "":
            continue
        (value,) = node.inputs
        perm = node.attributes.get_ints("perm", None)
        if value is None or not value.is_initializer() or value.name not in params or tuple(perm or ()) != (1, 0):
            continue
        rows, cols = value.shape.numpy()
        name = f"{value.name}.T"
        transposed = ir.Value(name=name, shape=ir.Shape([cols, rows]), type=value.type)
        transposed.const_value = Placeholder(name, value.dtype, (cols, rows))
        graph.register_initializer(transposed)
        node.outputs[0].replace_all_uses_with(transposed)
        graph.remove(node, safe=True)
        sources[name] = (value.name, True)
    for name, value in list(graph.initializers.items()):
        if name in params:
            if value.uses():
                sources[name] = (name, False)
            else:
                graph.initializers.pop(name)
    return sources


def fuse_parallel_projections(
    model: ir.Model, sources: dict[str, tuple[str, bool]]
) -> dict[str, tuple[tuple[str, ...], bool]]:
    """MatMuls reading one activation with stored-transposed weights (wq/wk/wv, w1/w3) → one MatMul over
    the weights side by side, then a Split: fewer, larger GEMMs per step for every runtime.

    Returns initializer → (checkpoint tensors side by side on its last axis, stored transposed).
    """
    graph = model.graph
    groups: dict[int, list[ir.Node]] = {}
    for node in graph:
        weight = node.inputs[1] if node.op_type == "MatMul" and node.domain == "" else None
        if weight is not None and sources.get(weight.name, ("", False))[1] and len(weight.uses()) == 1:
            groups.setdefault(id(node.inputs[0]), []).append(node)
    fused = {name: ((source,), transposed) for name, (source, transposed) in sources.items()}
    for nodes in groups.values():
        weights = [node.inputs[1] for node in nodes]
        if len(nodes) < 2 or len({(w.shape[0], w.dtype) for w in weights}) != 1:
            continue
        widths = [w.shape[1] for w in weights]
        name = side_by_side_name([w.name for w in weights])
        value = ir.Value(name=name, shape=ir.Shape([weights[0].shape[0], sum(widths)]), type=weights[0].type)
        value.const_value = Placeholder(name, weights[0].dtype, (weights[0].shape[0], sum(widths)))
        graph.register_initializer(value)
        sizes = ir.Value(name=f"{name}.split", shape=ir.Shape([len(widths)]), type=ir.TensorType(ir.DataType.INT64))
        sizes.const_value = ir.tensor(np.array(widths, dtype=np.int64))
        graph.register_initializer(sizes)
        matmul = ir.node("MatMul", [nodes[0].inputs[0], value])
        split = ir.node("Split", [matmul.outputs[0], sizes], {"axis": -1}, num_outputs=len(nodes))
        graph.insert_before(nodes[0], [matmul, split])
        first = nodes[0].outputs[0]
        matmul.outputs[0].type = first.type
        if first.shape is not None:
            matmul.outputs[0].shape = ir.Shape([*list(first.shape)[:-1], sum(widths)])
        for node, out in zip(nodes, split.outputs):
            out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
            node.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(nodes, safe=True)
        for weight in weights:
            graph.initializers.pop(weight.name)
        fused[name] = (tuple(fused.pop(w.name)[0][0] for w in weights), True)
    return fused


def side_by_side_name(names: list[str]) -> str:
    """layers.0.attention.wq.weight.T, ...wk..., ...wv... → layers.0.attention.wq+wk+wv.weight.T"""
    parts = [n.split(".") for n in names]
    head = 0
    while all(len(p) > head and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) - tail > head and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    middles = [".".join(p[head : len(p) - tail]) for p in parts]
    return ".".join([*parts[0][:head], "+".join(middles), *(parts[0][len(parts[0]) - tail :] if tail else [])])
