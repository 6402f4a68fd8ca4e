"""The `mistral-export` command line: parses, calls one stage function, prints."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from mistral_export.errors import MistralExportError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a Mistral checkpoint into ONNX / TensorRT engines and a Triton model repository.")

ModelArg = Annotated[str, typer.Argument(help="A checkpoint folder (HF config.json or native params.json), "
                                              "or a preset: tiny, mistral-7b-v0.1, mistral-7b-v0.3.")]


class Backend(str, Enum):
    eager = "eager"
    onnxruntime = "onnxruntime"


class PluginImpl(str, Enum):
    aot = "aot"
    jit = "jit"


class Attention(str, Enum):
    reference = "reference"
    triton = "triton"


@contextlib.contextmanager
def user_errors():
    """A user mistake becomes one line on stderr and exit code 2, never a traceback."""
    try:
        yield
    except MistralExportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def inspect(model: ModelArg,
            context: Annotated[int, typer.Option(help="Context length for the KV-cache estimate.")] = 32768) -> None:
    """Config, parameter count, weight bytes per dtype and KV-cache bytes per sequence."""
    from mistral_export.model.config import load_config
    from mistral_export.model.summary import describe

    with user_errors():
        rows = describe(load_config(model), context)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"
    int8_wo = "int8-wo"


@app.command()
def export(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for model.onnx, model.onnx.data and model.ort.onnx.")],
    precision: Annotated[Precision, typer.Option(help="fp32, fp16, int8 (W8A8, SmoothQuant) or int8-wo (W8A16).")] = Precision.fp32,
    opset: Annotated[int, typer.Option(help="ONNX opset of the standard ops (18..23).")] = 20,
    last_token_logits: Annotated[bool, typer.Option(help="Keep only the last position's logits ([B,1,V]).")] = False,
    plugin_impl: Annotated[PluginImpl, typer.Option(help="TensorRT plugin implementation the mistral nodes ask for "
                                                         "(node attribute aot=1 or 0); ONNX Runtime ignores it.")] = PluginImpl.aot,
    smoothquant_alpha: Annotated[float, typer.Option(help="int8: SmoothQuant migration strength alpha.")] = 0.5,
    no_smoothquant: Annotated[bool, typer.Option("--no-smoothquant", help="int8: plain W8A8, no smoothing.")] = False,
    calib_data: Annotated[Optional[Path], typer.Option(help="int8: calibration text (plain text, or JSONL with a "
                                                            "`text` field); default: the packaged calibration text.")] = None,
    calib_samples: Annotated[Optional[int], typer.Option(min=1, help="int8: calibration samples (default 32).")] = None,
    calib_seq_len: Annotated[Optional[int], typer.Option(min=1, help="int8: tokens per calibration sample (default 256).")] = None,
) -> None:
    """Trace MODEL to one ONNX graph (prefill chunks and decode) with the mistral:: custom ops in PRECISION, and its ONNX Runtime artifact."""
    from mistral_export.engines.onnxruntime_artifact import write_onnxruntime_artifact
    from mistral_export.export.precision import calibration_options, export_precision

    progress = logging.StreamHandler(sys.stderr)
    progress.setFormatter(logging.Formatter("[export] %(message)s"))
    logger = logging.getLogger("mistral_export")
    logger.addHandler(progress)
    logger.setLevel(logging.INFO)
    started = time.perf_counter()
    with user_errors():
        path = export_precision(model, output, precision.value, opset=opset, last_token_logits=last_token_logits,
                                plugin_impl=plugin_impl.value, smoothquant_alpha=None if no_smoothquant else smoothquant_alpha,
                                calibration=calibration_options(calib_data, calib_samples, calib_seq_len))
        logger.info("writing the ONNX Runtime artifact model.ort.onnx (function bodies inlined, shared mask)")
        write_onnxruntime_artifact(path)
    size = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith("model."))
    typer.echo(f"wrote {path} ({precision.value}; + model.onnx.data, model.ort.onnx; {size / 2**20:.1f} MiB) "
               f"in {time.perf_counter() - started:.1f} s")


@app.command()
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate (greedy).")] = 64,
    chunk_size: Annotated[Optional[int], typer.Option(min=1, help="Prefill the prompt in chunks of this many tokens.")] = None,
    backend: Annotated[Backend, typer.Option(help="eager: the PyTorch reference model; onnxruntime: an exported ONNX.")] = Backend.eager,
    onnx: Annotated[Optional[Path], typer.Option(help="Exported model.onnx (or its folder) for --backend onnxruntime.")] = None,
    attention: Annotated[Attention, typer.Option(help="Eager attention kernels: reference (torch) or triton (CUDA).")] = Attention.reference,
) -> None:
    """Greedy generation, tokens streamed to the terminal as they come."""
    from mistral_export.model.config import resolve_model_dir
    from mistral_export.model.tokenizer import load_tokenizer

    with user_errors():
        folder = resolve_model_dir(model)
        if folder is None:
            raise MistralExportError(f"preset '{model}' has no weights or tokenizer; pass a checkpoint folder or 'tiny'")
        runner = _make_runner(model, backend, onnx, attention)
        tokenizer = load_tokenizer(folder)
        _stream(runner, tokenizer, prompt, max_new_tokens, chunk_size)


def _make_runner(model: str, backend: Backend, onnx: Path | None, attention: Attention):
    from mistral_export.engines.runner import EagerRunner
    from mistral_export.model.checkpoint import load_model

    if backend is Backend.onnxruntime:
        from mistral_export.engines.onnxruntime_runner import OnnxRuntimeRunner

        if onnx is None:
            raise MistralExportError("--backend onnxruntime needs --onnx PATH (from `mistral-export export MODEL -o DIR`)")
        return OnnxRuntimeRunner(onnx)
    device = "cpu"
    if attention is Attention.triton:
        import torch

        if not torch.cuda.is_available():
            raise MistralExportError("--attention triton needs a CUDA GPU; none is visible to torch")
        import mistral_export.plugins.torch_cuda  # noqa: F401  (registers the CUDA kernels)

        device = "cuda"
    return EagerRunner(load_model(model, device=device), device=device)


def _stream(runner, tokenizer, prompt: str, max_new_tokens: int, chunk_size: int | None) -> None:
    from mistral_export.engines.runner import greedy_tokens

    prompt_ids = tokenizer.encode(prompt)
    typer.echo(prompt, nl=False)
    generated: list[int] = []
    shown = ""
    started = time.perf_counter()
    first_token_at = None
    for token in greedy_tokens(runner, prompt_ids, max_new_tokens, chunk_size, stop_id=tokenizer.eos_id):
        first_token_at = first_token_at or time.perf_counter()
        generated.append(token)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    typer.echo("")
    if len(generated) > 1:
        decode_seconds = time.perf_counter() - first_token_at
        typer.echo(f"[generate] {len(prompt_ids)} prompt tokens, first token after "
                   f"{first_token_at - started:.3f} s; {len(generated) - 1} more at "
                   f"{(len(generated) - 1) / decode_seconds:.1f} tokens/s", err=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
