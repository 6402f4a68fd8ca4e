"""The two onnxscript optimizer pieces the project composes itself, in one place.

onnxscript's public `optimizer.optimize_ir` runs constant folding and its default rewrite rules
as one fixed sequence, and folds every node it can. The exporter and the ONNX Runtime artifact
need them as separate passes, with folding kept off every node that reads a weight (weights are
streamed to disk and never loaded). onnxscript exposes neither the pass class nor the default
rule set publicly, so this module is the only place that reaches into its internals; pyproject
pins onnxscript to 0.7.x and tests/test_onnxscript_passes.py fails loudly if an upgrade moves them.
"""

from __future__ import annotations

import onnx_ir as ir


def fold_constants_pass(weights: set[str], output_size_limit: int) -> ir.passes.InPlacePass:
    """onnxscript's constant folding, kept off every node that reads one of `weights` (never loaded)."""
    from onnxscript.optimizer import _constant_folding

    def should_fold(node: ir.Node) -> bool | None:
        return False if any(v is not None and v.name in weights for v in node.inputs) else None

    return _constant_folding.FoldConstantsPass(
        shape_inference=True, input_size_limit=8192, output_size_limit=output_size_limit, should_fold=should_fold
    )


def default_rewrite_pass() -> ir.passes.InPlacePass:
    """onnxscript's default rewrite rules (no-op removal, reshape/slice/cast simplifications) as a pass."""
    from onnxscript import rewriter

    return rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES)
