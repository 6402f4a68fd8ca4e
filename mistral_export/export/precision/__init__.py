"""Precision of the exported ONNX: what a strongly typed TensorRT engine (and ONNX Runtime) will run.

    export_precision("tiny", "out/", "int8")

- fp32, fp16: traced from torch in that dtype (the generic fp16 converters break this graph:
  DESIGN.md, "Quantization facts").
- int8 (W8A8): SmoothQuant folded into the eager model's weights (α 0.5 by default; None: plain W8A8),
  the result traced in fp16, then int8 Q/DQ on every GEMM with activation ranges from calibration.
- int8-wo (W8A16): traced in fp16, then int8 weights behind DequantizeLinear.

The INT8 variants are fp16 everywhere else, so a TensorRT engine built from them is too; the norms'
statistics and the softmax run in fp32 through the graph's explicit casts. `model.onnx`'s
metadata_props record the precision (`mistral_export.precision`) and, for INT8, how it was
quantized (`mistral_export.quantization`, JSON).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path

import torch

from mistral_export.errors import MistralExportError
from mistral_export.export.onnx_export import MODEL_FILE, check_exportable, check_model, export_onnx, staged_model
from mistral_export.export.precision.calibration import (CalibrationOptions, calibration_samples, calibration_steps,
                                                         input_channel_maxima)
from mistral_export.model.transformer import Transformer
from mistral_export.op_contract import DEFAULT_PLUGIN_IMPL

__all__ = ["PRECISIONS", "CalibrationOptions", "calibration_options", "check_precision", "export_precision"]

PRECISIONS = ("fp32", "fp16", "int8", "int8-wo")
TRACE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float16, "int8-wo": torch.float16}
DEFAULT_SMOOTHQUANT_ALPHA = 0.5
PRECISION_KEY = "mistral_export.precision"
QUANTIZATION_KEY = "mistral_export.quantization"

log = logging.getLogger(__name__)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise MistralExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")


def calibration_options(data: Path | None = None, samples: int | None = None,
                        seq_len: int | None = None) -> CalibrationOptions:
    """CalibrationOptions from the command line's --calib-data/--calib-samples/--calib-seq-len (None: default)."""
    defaults = CalibrationOptions()
    return CalibrationOptions(data=data, samples=samples or defaults.samples, seq_len=seq_len or defaults.seq_len)


def export_precision(model_or_folder: Transformer | str | Path, out_dir: str | Path, precision: str = "fp32", *,
                     opset: int | None = None, last_token_logits: bool = False,
                     plugin_impl: str = DEFAULT_PLUGIN_IMPL, calibration: CalibrationOptions | None = None,
                     smoothquant_alpha: float | None = DEFAULT_SMOOTHQUANT_ALPHA, progress=None) -> Path:
    """OUT_DIR/model.onnx (+ .data) of MODEL in PRECISION; returns the path of model.onnx.

    `calibration` (int8 only): the text, sample count and length; default the shipped text.
    `smoothquant_alpha` (int8 only): SmoothQuant's migration strength in [0, 1], None for plain W8A8.
    `progress`: a rich Progress to add the calibration bar to (default: one on stderr).
    """
    check_precision(precision)
    if smoothquant_alpha is not None and not 0.0 <= smoothquant_alpha <= 1.0:
        raise MistralExportError(f"--smoothquant-alpha must be within [0, 1], got {smoothquant_alpha}")
    if isinstance(model_or_folder, Transformer):
        check_exportable(model_or_folder)
    options = {"last_token_logits": last_token_logits, "plugin_impl": plugin_impl,
               "dtype": TRACE_DTYPES[precision], "metadata": {PRECISION_KEY: precision}}
    if opset is not None:
        options["opset"] = opset
    if precision in ("fp32", "fp16"):
        return export_onnx(model_or_folder, out_dir, **options)

    out = Path(out_dir)
    with staged_model(out) as staging:
        if precision == "int8-wo":
            from mistral_export.export.precision.int8 import quantize_weights_only

            options["metadata"][QUANTIZATION_KEY] = json.dumps({
                "method": "W8A16 weight-only", "weights": "int8, symmetric, one scale per output channel",
                "activations": "float16"})
            source = export_onnx(model_or_folder, staging / "fp16", **options)
            quantize_weights_only(source, staging / MODEL_FILE)
        else:
            _quantize_w8a8(model_or_folder, staging, options, calibration or CalibrationOptions(), smoothquant_alpha,
                           progress)
        check_model(staging / MODEL_FILE)
    return out / MODEL_FILE


def _quantize_w8a8(model_or_folder, staging: Path, options: dict, calibration: CalibrationOptions,
                   alpha: float | None, progress) -> None:
    from mistral_export.export.precision.int8 import quantize_w8a8
    from mistral_export.export.precision.smoothquant import smooth

    model, tokenizer = _model_and_tokenizer(model_or_folder, calibration)
    samples = calibration_samples(calibration, tokenizer)
    options["metadata"][QUANTIZATION_KEY] = json.dumps({
        "method": "W8A8 SmoothQuant" if alpha is not None else "W8A8", "smoothquant_alpha": alpha,
        "weights": "int8, symmetric, one scale per output channel",
        "activations": "int8, symmetric, one static scale per tensor (MinMax over the calibration steps)",
        "calibration": calibration.describe()})
    log.info("calibration: %d samples of %d tokens", len(samples), calibration.seq_len)
    with _progress_bars(progress) as bars:
        if alpha is not None:
            maxima = input_channel_maxima(model, calibration_steps(model, samples, bars))
            if model is model_or_folder:  # the caller's model stays as it was; one loaded here is smoothed in place
                model = copy.deepcopy(model)
            smooth(model, maxima, alpha)
        source = export_onnx(model, staging / "fp16", **options)
        quantize_w8a8(source, staging / MODEL_FILE, calibration_steps(model, samples, bars))


def _model_and_tokenizer(model_or_folder, calibration: CalibrationOptions):
    from mistral_export.model.checkpoint import load_model
    from mistral_export.model.config import resolve_model_dir
    from mistral_export.model.tokenizer import load_tokenizer

    folder = calibration.tokenizer
    if isinstance(model_or_folder, Transformer):
        model = model_or_folder
    else:
        model = load_model(model_or_folder)  # fp32: calibration statistics of the reference model
        folder = folder or resolve_model_dir(model_or_folder)
    if folder is None:
        raise MistralExportError("int8 calibration of an in-memory model needs its tokenizer: "
                                 "CalibrationOptions(tokenizer=FOLDER with tokenizer.json)")
    return model, load_tokenizer(Path(folder))


@contextlib.contextmanager
def _progress_bars(progress):
    if progress is not None:
        yield progress
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bars:
        yield bars
