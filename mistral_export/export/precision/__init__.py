"""Precision of the exported ONNX: what a strongly typed TensorRT engine (and ONNX Runtime) will run.

    export_precision("tiny", "out/", "int8")

- fp32, fp16: traced from torch in that dtype (the generic fp16 converters break this graph:
  DESIGN.md, "Quantization facts").
- int8 (W8A8): calibrated one decoder layer at a time (layerwise.py: bounded memory), SmoothQuant folded into
  each layer's weights (α 0.5 by default; None: plain W8A8), the graph traced in fp16 with int8 Q/DQ on every
  GEMM: the weights quantized as they stream, the activation ranges from the calibration (w8a8.py, int8.py).
- int8-wo (W8A16): traced in fp16, int8 weights quantized as they stream from the checkpoint, behind
  DequantizeLinear. Neither INT8 precision writes or holds an fp16 copy of the model.
- int4-awq (W4A16): AWQ's activation-aware scales searched and folded one decoder layer at a time (awq.py;
  `awq=False`: plain round-to-nearest, streamed from the checkpoint), traced in fp16 at opset 21, INT4 weights
  blockwise along K quantized as they stream, behind DequantizeLinear (int4.py).
- fp8: traced in fp16, E4M3 Q/DQ on every GEMM's weight (per output channel, as they stream) and activation (per
  tensor, static scales from the layer-by-layer calibration) (fp8.py).

Every precision streams: the whole model is never in memory, in fp32 or any other dtype (quantized_weights.py,
layerwise.py).

The quantized variants are fp16 everywhere else, so a TensorRT engine built from them is too; the norms'
statistics and the softmax run in fp32 through the graph's explicit casts. `model.onnx`'s
metadata_props record the precision (`mistral_export.precision`) and, for the quantized ones, how it
was quantized (`mistral_export.quantization`, JSON).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from mistral_export.errors import MistralExportError
from mistral_export.export.onnx_export import DEFAULT_OPSET, check_exportable, export_graph, export_onnx
from mistral_export.export.precision.awq import awq_tensors
from mistral_export.export.precision.calibration import CalibrationOptions, calibration_samples
from mistral_export.export.precision.fp8 import Fp8Weights
from mistral_export.export.precision.int4 import DEFAULT_BLOCK_SIZE, Int4Weights, check_block_size
from mistral_export.export.precision.int4 import OPSET as INT4_OPSET
from mistral_export.export.precision.int8 import Int8Weights
from mistral_export.export.precision.w8a8 import W8A8Statistics, smoothquant_tensors
from mistral_export.model.transformer import Transformer
from mistral_export.op_contract import DEFAULT_PLUGIN_IMPL

__all__ = ["PRECISIONS", "CalibrationOptions", "calibration_options", "check_precision", "export_precision"]

PRECISIONS = ("fp32", "fp16", "int8", "int8-wo", "int4-awq", "fp8")
TRACE_DTYPES = {"fp32": torch.float32, **{p: torch.float16 for p in PRECISIONS[1:]}}
CALIBRATED = ("int8", "int4-awq", "fp8")  # the precisions that read calibration text
DEFAULT_SMOOTHQUANT_ALPHA = 0.5
PRECISION_KEY = "mistral_export.precision"
QUANTIZATION_KEY = "mistral_export.quantization"

log = logging.getLogger(__name__)


def opset_for(precision: str, opset: int | None = None) -> int:
    """The opset PRECISION exports at: OPSET if given (int4-awq refuses one below 21), else the precision's default."""
    if precision == "int4-awq" and opset is not None and opset < INT4_OPSET:
        raise MistralExportError(
            f"--precision int4-awq needs --opset {INT4_OPSET} or later (DequantizeLinear's block_size and INT4), "
            f"got {opset}"
        )
    return opset or (INT4_OPSET if precision == "int4-awq" else DEFAULT_OPSET)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise MistralExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")


def calibration_options(
    data: Path | None = None, samples: int | None = None, seq_len: int | None = None, device: str | None = None
) -> CalibrationOptions:
    """CalibrationOptions from the command line's --calib-data/--calib-samples/--calib-seq-len/--calib-device
    (None: default)."""
    defaults = CalibrationOptions()
    if device not in (None, "cpu", "cuda"):
        raise MistralExportError(f"--calib-device must be cpu or cuda, got '{device}'")
    return CalibrationOptions(
        data=data,
        samples=samples or defaults.samples,
        seq_len=seq_len or defaults.seq_len,
        device=device or defaults.device,
    )


def export_precision(
    model_or_folder: Transformer | str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    *,
    opset: int | None = None,
    last_token_logits: bool = False,
    plugin_impl: str = DEFAULT_PLUGIN_IMPL,
    calibration: CalibrationOptions | None = None,
    smoothquant_alpha: float | None = DEFAULT_SMOOTHQUANT_ALPHA,
    awq: bool = True,
    int4_block_size: int = DEFAULT_BLOCK_SIZE,
    progress=None,
) -> Path:
    """OUT_DIR/model.onnx (+ .data) of MODEL in PRECISION; returns the path of model.onnx.

    `calibration` (int8, int4-awq, fp8): the text, sample count and length; default the shipped text.
    `smoothquant_alpha` (int8 only): SmoothQuant's migration strength in [0, 1], None for plain W8A8.
    `awq`, `int4_block_size` (int4-awq only): AWQ's search (False: plain round-to-nearest), the block along K.
    `progress`: a rich Progress to add the calibration bar to (default: one on stderr).
    """
    check_precision(precision)
    if smoothquant_alpha is not None and not 0.0 <= smoothquant_alpha <= 1.0:
        raise MistralExportError(f"--smoothquant-alpha must be within [0, 1], got {smoothquant_alpha}")
    if precision == "int4-awq":
        check_block_size(int4_block_size)
    opset = opset_for(precision, opset)
    if isinstance(model_or_folder, Transformer):
        check_exportable(model_or_folder)
    options = {
        "last_token_logits": last_token_logits,
        "plugin_impl": plugin_impl,
        "dtype": TRACE_DTYPES[precision],
        "metadata": {PRECISION_KEY: precision},
    }
    options["opset"] = opset
    if precision in ("fp32", "fp16"):
        return export_onnx(model_or_folder, out_dir, **options)

    config, stream, source = _weights(model_or_folder)
    if precision == "int8-wo":
        options["metadata"][QUANTIZATION_KEY] = json.dumps(
            {
                "method": "W8A16 weight-only",
                "weights": "int8, symmetric, one scale per output channel",
                "activations": "float16",
            }
        )
        return export_graph(config, stream, out_dir, weights=Int8Weights(), **options)

    calibration = calibration or CalibrationOptions()
    if precision == "int4-awq":
        return _export_w4a16(
            model_or_folder, config, stream, source, out_dir, options, calibration, awq, int4_block_size, progress
        )
    samples = calibration_samples(calibration, _tokenizer(model_or_folder, calibration))
    if precision == "fp8":
        smoothquant_alpha = None  # fp8 takes the same layer-by-layer ranges, unsmoothed
        quantization = {
            "method": "FP8 E4M3",
            "weights": "float8e4m3fn, one scale per output channel (max |w| / 448); lm_head float16",
            "activations": "float8e4m3fn, one static scale per tensor (max |x| / 448 over the calibration steps, "
            "fp32, calibrated layer by layer)",
        }
    else:
        quantization = {
            "method": "W8A8 SmoothQuant" if smoothquant_alpha is not None else "W8A8",
            "smoothquant_alpha": smoothquant_alpha,
            "weights": "int8, symmetric, one scale per output channel",
            "activations": "int8, symmetric, one static scale per tensor (max |x| over the calibration steps, fp32, "
            "calibrated layer by layer)",
        }
    options["metadata"][QUANTIZATION_KEY] = json.dumps({**quantization, "calibration": calibration.describe()})
    statistics = W8A8Statistics()
    weights = Fp8Weights(statistics.activation_max) if precision == "fp8" else Int8Weights(statistics.activation_max)
    log.info("calibration: %d samples of %d tokens", len(samples), calibration.seq_len)
    with _progress_bars(progress) as bars:

        def calibrated():
            return smoothquant_tensors(
                source,
                config,
                samples,
                smoothquant_alpha,
                statistics,
                last_token_logits=last_token_logits,
                device=calibration.device,
                progress=bars,
            )

        return export_graph(config, calibrated, out_dir, weights=weights, **options)


def _export_w4a16(
    model_or_folder,
    config,
    stream,
    source,
    out_dir,
    options: dict,
    calibration: CalibrationOptions,
    use_awq: bool,
    block_size: int,
    progress,
) -> Path:
    check_block_size(block_size, config)
    options["metadata"][QUANTIZATION_KEY] = json.dumps(
        {
            "method": "W4A16 AWQ" if use_awq else "W4A16 round-to-nearest",
            "awq": use_awq,
            "weights": f"int4, symmetric, one fp16 scale per block of {block_size} along K and output channel, "
            "the lm_head included",
            "block_size": block_size,
            "activations": "float16",
            **({"calibration": calibration.describe()} if use_awq else {}),
        }
    )
    weights = Int4Weights(block_size)
    if not use_awq:  # round-to-nearest: the checkpoint streams into the export as for fp16
        return export_graph(config, stream, out_dir, weights=weights, **options)
    samples = calibration_samples(calibration, _tokenizer(model_or_folder, calibration))
    log.info("calibration: %d samples of %d tokens", len(samples), calibration.seq_len)
    with _progress_bars(progress) as bars:

        def scaled():
            return awq_tensors(source, config, samples, block_size, device=calibration.device, progress=bars)

        return export_graph(config, scaled, out_dir, weights=weights, **options)


def _weights(model_or_folder):
    """(config, the weights as stored one by one, one tensor by name: a copy the caller may change)."""
    if isinstance(model_or_folder, Transformer):
        params = dict(model_or_folder.named_parameters())
        return (
            model_or_folder.config,
            lambda: iter(params.items()),
            lambda name: params[name].detach().to(torch.float32, copy=True),
        )
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
        raise MistralExportError(
            "calibration of an in-memory model needs its tokenizer: "
            "CalibrationOptions(tokenizer=FOLDER with tokenizer.json)"
        )
    return load_tokenizer(Path(folder))


@contextlib.contextmanager
def _progress_bars(progress):
    if progress is not None:
        yield progress
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bars:
        yield bars
