"""The onnxscript internals the project uses (export/onnxscript_passes.py) still exist and behave.

onnxscript does not promise these names; an upgrade that moves them must fail here, loudly, rather
than deep inside an export.
"""

import numpy as np
import onnx_ir as ir

from mistral_export.export.onnxscript_passes import default_rewrite_pass, fold_constants_pass


def _graph():
    x = ir.Value(name="x", shape=ir.Shape([2, 3]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", shape=ir.Shape([3, 3]), type=ir.TensorType(ir.DataType.FLOAT))
    w.const_value = ir.tensor(np.eye(3, dtype=np.float32), name="w")
    two = ir.Value(name="two", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
    two.const_value = ir.tensor(np.float32(2.0), name="two")
    doubled_w = ir.node("Mul", [w, two])  # reads the weight: must not fold
    three = ir.node("Add", [two, two])  # constants only: folds
    identity = ir.node("Identity", [x])  # a no-op the default rules remove
    scaled = ir.node("Mul", [identity.outputs[0], three.outputs[0]])
    out = ir.node("MatMul", [scaled.outputs[0], doubled_w.outputs[0]])
    out.outputs[0].name = "y"
    graph = ir.Graph(
        [x], out.outputs, nodes=[doubled_w, three, identity, scaled, out], initializers=[w, two], opset_imports={"": 20}
    )
    return ir.Model(graph, ir_version=10)


def test_folding_skips_weights_and_rewrites_remove_no_ops():
    model = _graph()
    fold_constants_pass({"w"}, output_size_limit=1024)(model)
    ops = [n.op_type for n in model.graph]
    assert "Add" not in ops, "constant Add should fold"
    assert ops.count("Mul") == 2, "the Mul reading the weight must stay"
    default_rewrite_pass()(model)
    assert "Identity" not in [n.op_type for n in model.graph]
