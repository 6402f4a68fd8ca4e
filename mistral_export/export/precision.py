"""Precision of the exported ONNX: what a strongly typed TensorRT engine (and ONNX Runtime) will run.

    export_precision("tiny", "out/", "fp16")

fp32 and fp16 are traced from torch in that dtype (the generic fp16 converters break this graph:
DESIGN.md, "Quantization facts"). The INT8 variants are built on the fp16 graph.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mistral_export.errors import MistralExportError
from mistral_export.export.onnx_export import export_onnx
from mistral_export.model.transformer import Transformer
from mistral_export.op_contract import DEFAULT_PLUGIN_IMPL

PRECISIONS = ("fp32", "fp16", "int8", "int8-wo")
TRACE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise MistralExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")


def export_precision(model_or_folder: Transformer | str | Path, out_dir: str | Path, precision: str = "fp32", *,
                     opset: int | None = None, last_token_logits: bool = False,
                     plugin_impl: str = DEFAULT_PLUGIN_IMPL) -> Path:
    """OUT_DIR/model.onnx (+ .data) of MODEL in PRECISION; returns the path of model.onnx."""
    check_precision(precision)
    if precision not in TRACE_DTYPES:
        raise MistralExportError(f"precision {precision} is not available yet")
    options = {"last_token_logits": last_token_logits, "plugin_impl": plugin_impl}
    if opset is not None:
        options["opset"] = opset
    return export_onnx(model_or_folder, out_dir, dtype=TRACE_DTYPES[precision], **options)
