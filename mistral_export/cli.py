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


@app.command()
def export(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for model.onnx, model.onnx.data and model.ort.onnx.")],
    opset: Annotated[int, typer.Option(help="ONNX opset of the standard ops (18..23).")] = 20,
    last_token_logits: Annotated[bool, typer.Option(help="Keep only the last position's logits ([B,1,V]).")] = False,
    plugin_impl: Annotated[PluginImpl, typer.Option(help="TensorRT plugin implementation the mistral nodes ask for "
                                                         "(node attribute aot=1 or 0); ONNX Runtime ignores it.")] = PluginImpl.aot,
) -> None:
    """Trace MODEL to one ONNX graph (prefill chunks and decode) with the mistral:: custom ops, and its ONNX Runtime artifact."""
    from mistral_export.engines.onnxruntime_artifact import write_onnxruntime_artifact
    from mistral_export.export.onnx_export import export_onnx

    progress = logging.StreamHandler(sys.stderr)
    progress.setFormatter(logging.Formatter("[export] %(message)s"))
    logger = logging.getLogger("mistral_export")
    logger.addHandler(progress)
    logger.setLevel(logging.INFO)
    started = time.perf_counter()
    with user_errors():
        path = export_onnx(model, output, opset=opset, last_token_logits=last_token_logits, plugin_impl=plugin_impl.value)
        logger.info("writing the ONNX Runtime artifact model.ort.onnx (function bodies inlined, shared mask)")
        write_onnxruntime_artifact(path)
    size = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith("model."))
    typer.echo(f"wrote {path} (+ model.onnx.data, model.ort.onnx; {size / 2**20:.1f} MiB) "
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


class DeployBackend(str, Enum):
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


@app.command()
def package(
    build_dir: Annotated[Path, typer.Argument(help="A build folder (from `mistral-export build`).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The Triton model repository to write into.")],
    name: Annotated[Optional[str], typer.Option(help="Model name (default: the build's model name).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Sequences generated together per model instance.")] = 8,
    instances: Annotated[int, typer.Option(min=1, help="Model instances (each holds its own batch).")] = 1,
    backend: Annotated[Optional[DeployBackend], typer.Option(help="Which artifact to serve (default: TensorRT "
                                                                  "engines if the build has them, else ONNX Runtime).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="Which precision, when the build has several.")] = None,
) -> None:
    """Write a Triton Inference Server model repository (text generation, streaming, in-flight batching)."""
    from mistral_export.deploy.repository import package as write_repository

    with user_errors():
        written = write_repository(build_dir, output, name=name, max_batch=max_batch, instances=instances,
                                   backend=backend.value if backend else None, precision=precision)
    for folder in written:
        typer.echo(f"wrote {folder}")
    typer.echo(f"start it with: mistral-export serve {output}")


@app.command()
def serve(
    repository: Annotated[Path, typer.Argument(help="A model repository (from `mistral-export package`).")],
    http_port: Annotated[int, typer.Option(help="HTTP/REST port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 to accept other machines).")] = "127.0.0.1",
) -> None:
    """Start Triton Inference Server on REPOSITORY; Ctrl-C shuts it down cleanly."""
    import signal

    from mistral_export.deploy.server import Ports, running_server

    ports = Ports(http_port, grpc_port, metrics_port)
    with user_errors(), running_server(repository, ports, host) as process:
        typer.echo(f"ready: HTTP http://{host}:{ports.http}  gRPC {host}:{ports.grpc}  "
                   f"metrics http://{host}:{ports.metrics}/metrics  (Ctrl-C stops)", err=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it as cleanly as Ctrl-C
        try:
            process.wait()
        except KeyboardInterrupt:
            typer.echo("stopping tritonserver", err=True)
    if process.returncode not in (0, -signal.SIGTERM):
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
