"""Precision of the exported ONNX: what a strongly typed TensorRT engine (and ONNX Runtime) will run.

    export_precision("tiny", "out/", "int8")

- fp32, fp16: traced from torch in that dtype (the generic fp16 converters break this graph:
  DESIGN.md, "Quantization facts").
- int8 (W8A8): calibrated one decoder layer at a time (layerwise.py: bounded memory), SmoothQuant folded into
  each layer's weights (α 0.5 by default; None: plain W8A8), the graph traced in fp16 with int8 Q/DQ on every
  GEMM: the weights quantized as they stream, the activation ranges from the calibration (w8a8.py, int8.py).
- int8-wo (W8A16): traced in fp16, int8 weights quantized as they stream from the checkpoint, behind
  DequantizeLinear. Neither INT8 precision writes or holds an fp16 copy of the model.

The INT8 variants are fp16 everywhere else, so a TensorRT engine built from them is too; the norms'
statistics and the softmax run in fp32 through the graph's explicit casts. `model.onnx`'s
metadata_props record the precision (`mistral_export.precision`) and, for INT8, how it was
quantized (`mistral_export.quantization`, JSON).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from mistral_export.errors import MistralExportError
from mistral_export.export.onnx_export import check_exportable, export_graph, export_onnx
from mistral_export.export.precision.calibration import CalibrationOptions, calibration_samples
from mistral_export.export.precision.int8 import Int8Weights
from mistral_export.export.precision.w8a8 import W8A8Statistics, smoothquant_tensors
from mistral_export.model.transformer import Transformer
from mistral_export.op_contract import DEFAULT_PLUGIN_IMPL

__all__ = ["PRECISIONS", "CalibrationOptions", "calibration_options", "check_precision", "export_precision"]

PRECISIONS = ("fp32", "fp16", "int8", "int8-wo")
TRACE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float16, "int8-wo": torch.float16}
DEFAULT_SMOOTHQUANT_ALPHA = 0.5
PRECISION_KEY = "mistral_export.precision"
QUANTIZATION_KEY = "mistral_export.quantization"


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise MistralExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")


def calibration_options(data: Path | None = None, samples: int | None = None,
                        seq_len: int | None = None, device: str | None = None) -> CalibrationOptions:
    """CalibrationOptions from the command line's --calib-data/--calib-samples/--calib-seq-len/--calib-device
    (None: default)."""
    defaults = CalibrationOptions()
    if device not in (None, "cpu", "cuda"):
        raise MistralExportError(f"--calib-device must be cpu or cuda, got '{device}'")
    return CalibrationOptions(data=data, samples=samples or defaults.samples, seq_len=seq_len or defaults.seq_len,
                              device=device or defaults.device)


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

    config, stream, source = _weights(model_or_folder)
    if precision == "int8-wo":
        options["metadata"][QUANTIZATION_KEY] = json.dumps({
            "method": "W8A16 weight-only", "weights": "int8, symmetric, one scale per output channel",
            "activations": "float16"})
        return export_graph(config, stream, out_dir, weights=Int8Weights(), **options)

    calibration = calibration or CalibrationOptions()
    samples = calibration_samples(calibration, _tokenizer(model_or_folder, calibration))
    options["metadata"][QUANTIZATION_KEY] = json.dumps({
        "method": "W8A8 SmoothQuant" if smoothquant_alpha is not None else "W8A8", "smoothquant_alpha": smoothquant_alpha,
        "weights": "int8, symmetric, one scale per output channel",
        "activations": "int8, symmetric, one static scale per tensor (max |x| over the calibration steps, fp32, "
                       "calibrated layer by layer)",
        "calibration": calibration.describe()})
    statistics = W8A8Statistics()
    with _progress_bars(progress) as bars:
        def smoothed():
            return smoothquant_tensors(source, config, samples, smoothquant_alpha, statistics,
                                       last_token_logits=last_token_logits, device=calibration.device, progress=bars)
        return export_graph(config, smoothed, out_dir, weights=Int8Weights(statistics.activation_max), **options)


def _weights(model_or_folder):
    """(config, the weights as stored one by one, one tensor by name: a copy the caller may change)."""
    if isinstance(model_or_folder, Transformer):
        params = dict(model_or_folder.named_parameters())
        return (model_or_folder.config, lambda: iter(params.items()),
                lambda name: params[name].detach().to(torch.float32, copy=True))
    from mistral_export.export.onnx_export import stored_dtype
    from mistral_export.model.checkpoint import Checkpoint
    from mistral_export.model.config import load_config, resolve_model_dir

    config = load_config(model_or_folder)
    folder = resolve_model_dir(model_or_folder)
    if folder is None:
        raise MistralExportError(f"preset '{model_or_folder}' has shapes only, no weights; pass a checkpoint folder")
    checkpoint = Checkpoint(folder, config)
    stored = stored_dtype(checkpoint, torch.float16)
    return (config, lambda: checkpoint.tensors(stored), lambda name: checkpoint.tensor(name, stored))


def _tokenizer(model_or_folder, calibration: CalibrationOptions):
    from mistral_export.model.config import resolve_model_dir
    from mistral_export.model.tokenizer import load_tokenizer

    folder = calibration.tokenizer
    if not isinstance(model_or_folder, Transformer):
        folder = folder or resolve_model_dir(model_or_folder)
    if folder is None:
        raise MistralExportError("int8 calibration of an in-memory model needs its tokenizer: "
                                 "CalibrationOptions(tokenizer=FOLDER with tokenizer.json)")
    return load_tokenizer(Path(folder))


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
