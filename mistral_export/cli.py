"""The `mistral-export` command line: parses, calls one stage function, prints."""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from mistral_export.artifacts.description import BACKENDS
from mistral_export.errors import MistralExportError
from mistral_export.export.onnx_export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from mistral_export.export.precision import DEFAULT_SMOOTHQUANT_ALPHA, PRECISIONS
from mistral_export.export.precision.calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from mistral_export.export.precision.int4 import DEFAULT_BLOCK_SIZE
from mistral_export.export.precision.int4 import OPSET as INT4_OPSET
from mistral_export.op_contract import DEFAULT_PLUGIN_IMPL, PLUGIN_IMPLS
from mistral_export.pipeline.build import BUILD_BACKENDS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn a Mistral checkpoint into ONNX / TensorRT engines and a Triton model repository.",
)

ModelArg = Annotated[
    str,
    typer.Argument(
        help="A checkpoint folder (HF config.json or native params.json), "
        "or a preset: tiny, mistral-7b-v0.1, mistral-7b-v0.3."
    ),
]


def _choices(name: str, values) -> type[Enum]:
    """A typer choice list from the constants that own the values (one spelling everywhere)."""
    return Enum(name, [(v.replace("-", "_"), v) for v in values], type=str)


Precision = _choices("Precision", PRECISIONS)
BuildBackend = _choices("BuildBackend", BUILD_BACKENDS)
RunBackend = _choices("RunBackend", ("eager", *BACKENDS))
DeployBackend = _choices("DeployBackend", BACKENDS)
PluginImpl = _choices("PluginImpl", PLUGIN_IMPLS)
Attention = _choices("Attention", ("reference", "triton"))
Device = _choices("Device", ("cpu", "cuda"))

# Options `export` and `build` share (the export and precision stage's options), with the defaults their owners set.
PrecisionOpt = Annotated[
    Precision,
    typer.Option(
        help="fp32, fp16, int8 (W8A8, SmoothQuant), int8-wo (W8A16), "
        "int4-awq (W4A16, AWQ) or fp8 (E4M3 weights and activations)."
    ),
]
OpsetOpt = Annotated[
    Optional[int],
    typer.Option(
        min=MIN_OPSET,
        max=MAX_OPSET,
        help=f"ONNX opset of the standard ops (default {DEFAULT_OPSET}; int4-awq {INT4_OPSET}).",
    ),
]
LastTokenLogitsOpt = Annotated[bool, typer.Option(help="Keep only the last position's logits ([B,1,V]).")]
PluginImplOpt = Annotated[
    PluginImpl,
    typer.Option(
        help="TensorRT plugin implementation the mistral nodes ask for "
        "(node attribute aot=1 or 0); ONNX Runtime ignores it."
    ),
]
SmoothQuantAlphaOpt = Annotated[float, typer.Option(help="int8: SmoothQuant migration strength alpha.")]
NoSmoothQuantOpt = Annotated[bool, typer.Option("--no-smoothquant", help="int8: plain W8A8, no smoothing.")]
NoAwqOpt = Annotated[bool, typer.Option("--no-awq", help="int4-awq: plain round-to-nearest, no AWQ scales.")]
Int4BlockSizeOpt = Annotated[int, typer.Option(help="int4-awq: weights per fp16 scale along K (32, 64 or 128).")]
CalibDataOpt = Annotated[
    Optional[Path],
    typer.Option(
        help="int8, int4-awq, fp8: calibration text (plain text, or JSONL with a `text` "
        "field); default: the packaged calibration text."
    ),
]
CalibSamplesOpt = Annotated[int, typer.Option(min=1, help="int8, int4-awq, fp8: calibration samples.")]
CalibSeqLenOpt = Annotated[int, typer.Option(min=2, help="int8, int4-awq, fp8: tokens per calibration sample.")]
CalibDeviceOpt = Annotated[Device, typer.Option(help="int8: where the layer-by-layer calibration runs.")]
NoWaitOpt = Annotated[
    bool,
    typer.Option(
        "--no-wait", help="Refuse, instead of waiting, when another process is writing into the output folder."
    ),
]


@contextlib.contextmanager
def user_errors():
    """A user mistake becomes one line on stderr and exit code 2, never a traceback."""
    try:
        yield
    except MistralExportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        if exc.errno not in _OUT_OF_SPACE:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        typer.echo(
            f"error: out of space{where}: {exc.strerror} (free disk space, or raise the file size limit, then "
            f"run the command again: what it finished is kept, nothing half-written is)",
            err=True,
        )
        raise typer.Exit(2) from None


# A full disk, a quota, or a file size limit (RLIMIT_FSIZE) reached: the machine's state, not a bug to trace back.
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@app.command()
def inspect(
    model: Annotated[
        str,
        typer.Argument(
            help="A build folder (from `build`), a checkpoint folder, or a preset: "
            "tiny, mistral-7b-v0.1, mistral-7b-v0.3."
        ),
    ],
    context: Annotated[int, typer.Option(help="Context length for the KV-cache estimate.")] = 32768,
) -> None:
    """A build folder: what was built (precisions, backends, GPU, sizes, options). A model: config, parameter count,
    weight bytes per dtype and KV-cache bytes per sequence."""
    from mistral_export.artifacts.describe import describe_build
    from mistral_export.artifacts.folder import is_build_folder
    from mistral_export.model.config import load_config
    from mistral_export.model.summary import describe

    with user_errors():
        rows = describe_build(model) if is_build_folder(model) else describe(load_config(model), context)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


@contextlib.contextmanager
def _log_to_stderr(pattern: str):
    """The pipeline's log messages on this command's stderr, for the command only (the handler goes with it:
    in one process running several commands, a later one must not write to an earlier one's closed stream)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(pattern))
    logger = logging.getLogger("mistral_export")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@app.command()
def export(
    model: ModelArg,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for model.onnx, model.onnx.data and model.ort.onnx.")
    ],
    precision: PrecisionOpt = Precision.fp32,
    opset: OpsetOpt = None,
    last_token_logits: LastTokenLogitsOpt = False,
    plugin_impl: PluginImplOpt = PluginImpl[DEFAULT_PLUGIN_IMPL],
    smoothquant_alpha: SmoothQuantAlphaOpt = DEFAULT_SMOOTHQUANT_ALPHA,
    no_smoothquant: NoSmoothQuantOpt = False,
    no_awq: NoAwqOpt = False,
    int4_block_size: Int4BlockSizeOpt = DEFAULT_BLOCK_SIZE,
    calib_data: CalibDataOpt = None,
    calib_samples: CalibSamplesOpt = DEFAULT_SAMPLES,
    calib_seq_len: CalibSeqLenOpt = DEFAULT_SEQ_LEN,
    calib_device: CalibDeviceOpt = Device.cpu,
) -> None:
    """Trace MODEL to one ONNX graph (prefill chunks and decode) with the mistral:: custom ops in PRECISION, and its ONNX Runtime artifact."""
    from mistral_export.engines.onnxruntime.artifact import write_onnxruntime_artifact
    from mistral_export.pipeline.build import export_with_options
    from mistral_export.pipeline.progress import BuildProgress

    started = time.perf_counter()
    options = _precision_options(
        smoothquant_alpha,
        no_smoothquant,
        no_awq,
        int4_block_size,
        calib_data,
        calib_samples,
        calib_seq_len,
        calib_device,
    )
    with user_errors(), _log_to_stderr("[export] %(message)s") as logger:
        path = export_with_options(
            model,
            output,
            precision.value,
            opset,
            last_token_logits,
            plugin_impl.value,
            options,
            BuildProgress(quiet=True),
        )
        logger.info("writing the ONNX Runtime artifact model.ort.onnx (GroupQueryAttention, cache updated in place)")
        write_onnxruntime_artifact(path)
    size = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith("model."))
    typer.echo(
        f"wrote {path} ({precision.value}; + model.onnx.data, model.ort.onnx; {size / 2**20:.1f} MiB) "
        f"in {time.perf_counter() - started:.1f} s"
    )


def _precision_options(
    smoothquant_alpha: float,
    no_smoothquant: bool,
    no_awq: bool,
    int4_block_size: int,
    calib_data: Path | None,
    calib_samples: int,
    calib_seq_len: int,
    calib_device,
):
    from mistral_export.pipeline.build import PrecisionOptions

    return PrecisionOptions(
        smoothquant_alpha=None if no_smoothquant else smoothquant_alpha,
        awq=not no_awq,
        int4_block_size=int4_block_size,
        calib_data=calib_data,
        calib_samples=calib_samples,
        calib_seq_len=calib_seq_len,
        calib_device=calib_device.value,
    )


@app.command()
def build(
    model: ModelArg,
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="The build folder (created; stages already built there with the same inputs are skipped).",
        ),
    ],
    precision: PrecisionOpt = Precision.fp32,
    backend: Annotated[
        BuildBackend,
        typer.Option(
            help="tensorrt: an engine for this GPU; onnxruntime: the ONNX Runtime "
            "artifact; auto: TensorRT where TensorRT and a GPU are present."
        ),
    ] = BuildBackend.auto,
    opset: OpsetOpt = None,
    last_token_logits: LastTokenLogitsOpt = False,
    plugin_impl: PluginImplOpt = PluginImpl[DEFAULT_PLUGIN_IMPL],
    smoothquant_alpha: SmoothQuantAlphaOpt = DEFAULT_SMOOTHQUANT_ALPHA,
    no_smoothquant: NoSmoothQuantOpt = False,
    no_awq: NoAwqOpt = False,
    int4_block_size: Int4BlockSizeOpt = DEFAULT_BLOCK_SIZE,
    calib_data: CalibDataOpt = None,
    calib_samples: CalibSamplesOpt = DEFAULT_SAMPLES,
    calib_seq_len: CalibSeqLenOpt = DEFAULT_SEQ_LEN,
    calib_device: CalibDeviceOpt = Device.cpu,
    max_batch: Annotated[int, typer.Option(min=1, help="TensorRT: largest batch the engine runs.")] = 8,
    opt_batch: Annotated[int, typer.Option(min=1, help="TensorRT: batch the engine is tuned for.")] = 1,
    max_chunk: Annotated[int, typer.Option(min=1, help="TensorRT: longest prefill chunk one step runs.")] = 512,
    builder_opt_level: Annotated[
        Optional[int], typer.Option(min=0, max=5, help="TensorRT builder optimization level (default: TensorRT's, 3).")
    ] = None,
    timing_cache: Annotated[
        Optional[Path],
        typer.Option(help="TensorRT timing cache, reused across builds (default ~/.cache/mistral-export/)."),
    ] = None,
    no_wait: NoWaitOpt = False,
) -> None:
    """Checkpoint to serving artifacts in one folder: tokenizer, ONNX of the precision, then a TensorRT engine for
    this GPU or the ONNX Runtime artifact. Stages whose inputs did not change are skipped."""
    from mistral_export.engines.tensorrt.builder import DEFAULT_TIMING_CACHE, EngineOptions
    from mistral_export.pipeline.build import build as run_build
    from mistral_export.pipeline.progress import BuildProgress

    precision_options = _precision_options(
        smoothquant_alpha,
        no_smoothquant,
        no_awq,
        int4_block_size,
        calib_data,
        calib_samples,
        calib_seq_len,
        calib_device,
    )
    engine_options = EngineOptions(
        max_batch=max_batch,
        opt_batch=opt_batch,
        max_chunk=max_chunk,
        builder_optimization_level=builder_opt_level,
        timing_cache=timing_cache or DEFAULT_TIMING_CACHE,
    )
    progress = BuildProgress()
    with user_errors():
        out = run_build(
            model,
            output,
            precision.value,
            backend.value,
            opset=opset,
            last_token_logits=last_token_logits,
            plugin_impl=plugin_impl.value,
            precision_options=precision_options,
            engine_options=engine_options,
            progress=progress,
            wait=not no_wait,
        )
    _print_build_summary(out)


def _print_build_summary(out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from mistral_export.artifacts.describe import last_run_rows

    table = Table(title=f"{out}", title_justify="left", box=None, pad_edge=False)
    for column in ("stage", "this run", "files", "size"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for row in last_run_rows(out):
        table.add_row(*row)
    Console().print(table)


@app.command()
def generate(
    model: Annotated[
        Optional[str],
        typer.Argument(help="A checkpoint folder or `tiny` (eager and --onnx runs; not needed with --build)."),
    ] = None,
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = ...,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate (greedy).")] = 64,
    chunk_size: Annotated[
        Optional[int], typer.Option(min=1, help="Prefill the prompt in chunks of this many tokens.")
    ] = None,
    backend: Annotated[
        Optional[RunBackend],
        typer.Option(
            help="eager: the PyTorch reference model; onnxruntime: an ONNX Runtime artifact (--build) or export (--onnx); "
            "tensorrt: an engine (--build). Default: with --build as `build --backend auto` picks (a TensorRT engine "
            "for this GPU where TensorRT imports, else ONNX Runtime), with --onnx onnxruntime, else eager."
        ),
    ] = None,
    build_dir: Annotated[
        Optional[Path],
        typer.Option("--build", help="A build folder (from `build`) for --backend onnxruntime|tensorrt."),
    ] = None,
    precision: Annotated[Optional[str], typer.Option(help="Which precision of the build folder to run.")] = None,
    onnx: Annotated[
        Optional[Path], typer.Option(help="A plain export folder (model.onnx) for --backend onnxruntime.")
    ] = None,
    device: Annotated[
        Device, typer.Option(help="onnxruntime: CPU or CUDA execution provider (onnxruntime-gpu).")
    ] = Device.cpu,
    attention: Annotated[
        Attention, typer.Option(help="Eager attention kernels: reference (torch) or triton (CUDA).")
    ] = Attention.reference,
) -> None:
    """Greedy generation, tokens streamed to the terminal as they come."""
    from mistral_export.model.config import resolve_model_dir
    from mistral_export.model.tokenizer import find_tokenizer_source, load_tokenizer
    from mistral_export.runners.base import check_generation_fits

    with user_errors():
        backend = _run_backend(backend, build_dir, onnx, precision)
        runner = _make_runner(model, backend, build_dir, precision, onnx, device, attention)
        folder = resolve_model_dir(model) if model else None
        if build_dir is not None and find_tokenizer_source(build_dir):
            folder = build_dir  # the build folder carries the tokenizer.json converted at build
        if folder is None:
            raise MistralExportError(
                "no tokenizer: pass a checkpoint folder or 'tiny' as MODEL"
                + (f" ('{model}' has shapes only)" if model else "")
            )
        tokenizer = load_tokenizer(folder)
        prompt_ids = tokenizer.encode(prompt)
        check_generation_fits(runner, len(prompt_ids), max_new_tokens)  # refused before anything is printed
        _stream(runner, tokenizer, prompt, max_new_tokens, chunk_size)


def _run_backend(
    requested: RunBackend | None, build_dir: Path | None, onnx: Path | None, precision: str | None
) -> RunBackend:
    """--backend, or the default: for --build what `build --backend auto` would build (said on stderr)."""
    from mistral_export.artifacts.folder import find_artifacts, is_build_folder

    if onnx is not None and is_build_folder(onnx):
        raise MistralExportError(
            f"--onnx {onnx}: this is a build folder (it has build.json), not an export folder; "
            f"run it with --build {onnx}"
        )
    if requested is not None:
        return requested
    if build_dir is None:
        return RunBackend.onnxruntime if onnx is not None else RunBackend.eager
    from mistral_export.pipeline.build import choose_backend

    chosen, _, why = choose_backend("auto")
    if chosen == "tensorrt" and not any(a.backend == "tensorrt" for a in find_artifacts(build_dir, precision)):
        why = f"{why}, but {build_dir} holds no TensorRT engine" + (f" of {precision}" if precision else "")
        chosen = "onnxruntime"
    typer.echo(f"[generate] backend: {chosen} ({why}; --backend overrides)", err=True)
    return RunBackend(chosen)


def _make_runner(
    model: str | None,
    backend: RunBackend,
    build_dir: Path | None,
    precision: str | None,
    onnx: Path | None,
    device: Device,
    attention: Attention,
):
    from mistral_export.model.checkpoint import load_model
    from mistral_export.runners.base import EagerRunner

    if backend is not RunBackend.eager and build_dir is not None:
        from mistral_export.artifacts.folder import select_artifact
        from mistral_export.runners import open_runner

        artifact = select_artifact(build_dir, backend.value, precision)
        return open_runner(artifact, providers=_providers(device) if backend is RunBackend.onnxruntime else None)
    if backend is RunBackend.tensorrt:
        raise MistralExportError(
            "--backend tensorrt needs --build DIR (from `mistral-export build MODEL -o DIR --backend tensorrt`)"
        )
    if backend is RunBackend.onnxruntime:
        from mistral_export.runners.onnxruntime import OnnxRuntimeRunner

        if onnx is None:
            raise MistralExportError(
                "--backend onnxruntime needs --build DIR (from `mistral-export build`) or "
                "--onnx DIR (from `mistral-export export`)"
            )
        return OnnxRuntimeRunner(onnx, providers=_providers(device))
    if model is None:
        raise MistralExportError("--backend eager needs MODEL (a checkpoint folder or 'tiny')")
    torch_device = "cpu"
    if attention is Attention.triton:
        import torch

        if not torch.cuda.is_available():
            raise MistralExportError("--attention triton needs a CUDA GPU; none is visible to torch")
        import mistral_export.plugins.torch_cuda  # noqa: F401  (registers the CUDA kernels)

        torch_device = "cuda"
    return EagerRunner(load_model(model, device=torch_device), device=torch_device)


def _providers(device: Device) -> list[str]:
    import onnxruntime as ort

    if device is Device.cpu:
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise MistralExportError(
            "--device cuda needs ONNX Runtime's CUDA execution provider (pip install "
            "'mistral-export[gpu]', which brings onnxruntime-gpu); this ONNX Runtime has "
            f"{', '.join(ort.get_available_providers())}"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _stream(runner, tokenizer, prompt: str, max_new_tokens: int, chunk_size: int | None) -> None:
    from mistral_export.runners.base import greedy_tokens

    prompt_ids = tokenizer.encode(prompt)
    typer.echo(prompt, nl=False)
    generated: list[int] = []
    shown = ""
    started = time.perf_counter()
    first_token_at = None
    try:
        for token in greedy_tokens(runner, prompt_ids, max_new_tokens, chunk_size, stop_id=tokenizer.eos_id):
            first_token_at = first_token_at or time.perf_counter()
            generated.append(token)
            text = tokenizer.decode(generated)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(shown) :])
                sys.stdout.flush()
                shown = text
    finally:  # the streamed text ends its line, whatever ends it: an error after it starts on a line of its own
        typer.echo("")
    if len(generated) > 1:
        decode_seconds = time.perf_counter() - first_token_at
        typer.echo(
            f"[generate] {len(prompt_ids)} prompt tokens, first token after "
            f"{first_token_at - started:.3f} s; {len(generated) - 1} more at "
            f"{(len(generated) - 1) / decode_seconds:.1f} tokens/s",
            err=True,
        )


ThreadsOption = Annotated[
    Optional[int],
    typer.Option(
        min=1, help="Threads for the artifact and the eager model (default: every core this process may use)."
    ),
]


@app.command()
def validate(
    build_dir: Annotated[
        Path, typer.Argument(metavar="DIR", help="A build folder (`mistral-export build MODEL -o DIR`).")
    ],
    model: Annotated[
        Optional[str], typer.Option(help="Checkpoint for the eager reference (default: the one build.json records).")
    ] = None,
    precision: Annotated[Optional[str], typer.Option(help="Validate only the artifacts of this precision.")] = None,
    prompts: Annotated[
        Optional[Path], typer.Option(help="Prompts: a JSON list of strings (*.json) or one per line.")
    ] = None,
    report_dir: Annotated[Optional[Path], typer.Option(help="Where the report goes (default: DIR/report).")] = None,
    quick: Annotated[bool, typer.Option(help="A smaller case set and fewer timed steps, same report.")] = False,
    threads: ThreadsOption = None,
) -> None:
    """Parity and latency of every artifact in DIR against the fp32 eager model; exit 1 when a parity bar fails."""
    from mistral_export.validate.console import print_summary
    from mistral_export.validate.suite import validate_build

    with user_errors():
        report = validate_build(
            build_dir,
            model=model,
            precision=precision,
            prompts=prompts,
            report_dir=report_dir,
            quick=quick,
            threads=threads,
        )
    print_summary(report, report_dir or build_dir / "report")
    if not report["passed"]:
        raise typer.Exit(1)


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MistralExportError(f"{option} expects comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise MistralExportError(f"{option} expects positive integers, got '{text}'")
    return values


@app.command()
def bench(
    build_dir: Annotated[
        Path, typer.Argument(metavar="DIR", help="A build folder (`mistral-export build MODEL -o DIR`).")
    ],
    batches: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,4,16",
    prompt_lengths: Annotated[
        Optional[str], typer.Option(help="Prefill lengths, comma-separated (default: W/4, W, 4W).")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="Timed steps (decode) or prefills per grid point.")] = 20,
    model: Annotated[
        Optional[str], typer.Option(help="Checkpoint for the eager baseline (default: build.json's).")
    ] = None,
    report_dir: Annotated[
        Optional[Path], typer.Option(help="Where bench.json and bench.png go (default: DIR/report).")
    ] = None,
    threads: ThreadsOption = None,
) -> None:
    """Latency alone, over a grid (batch x context x prompt length), for every artifact in DIR and the eager model."""
    from mistral_export.validate.bench import bench_build
    from mistral_export.validate.console import print_bench

    with user_errors():
        report = bench_build(
            build_dir,
            batches=_int_list(batches, "--batches"),
            prompt_lengths=_int_list(prompt_lengths, "--prompt-lengths") if prompt_lengths else None,
            samples=samples,
            model=model,
            report_dir=report_dir,
            threads=threads,
        )
    print_bench(report, report_dir or build_dir / "report")


@app.command()
def package(
    build_dir: Annotated[Path, typer.Argument(help="A build folder (from `mistral-export build`).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The Triton model repository to write into.")],
    name: Annotated[Optional[str], typer.Option(help="Model name (default: the build's model name).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Sequences generated together per model instance.")] = 8,
    instances: Annotated[int, typer.Option(min=1, help="Model instances (each holds its own batch).")] = 1,
    backend: Annotated[
        Optional[DeployBackend],
        typer.Option(
            help="Which artifact to serve (default: TensorRT engines if the build has them, else ONNX Runtime)."
        ),
    ] = None,
    precision: Annotated[Optional[str], typer.Option(help="Which precision, when the build has several.")] = None,
    prefill_chunk: Annotated[
        int, typer.Option(min=1, help="Prompt tokens per prefill step (a TensorRT engine's --max-chunk at most).")
    ] = 256,
    kubernetes: Annotated[
        bool,
        typer.Option(
            help="Also write OUTPUT/kubernetes/: Deployment, Service, "
            "HorizontalPodAutoscaler and the image's Dockerfile."
        ),
    ] = False,
    image: Annotated[
        Optional[str],
        typer.Option(
            help="--kubernetes: the image the pods run (default: mistral-export-"
            "NAME:latest, built from kubernetes/Dockerfile)."
        ),
    ] = None,
    replicas: Annotated[
        int, typer.Option(min=1, help="--kubernetes: replicas at start, the autoscaler's minimum.")
    ] = 1,
    max_replicas: Annotated[int, typer.Option(min=1, help="--kubernetes: the autoscaler's maximum.")] = 4,
    no_wait: NoWaitOpt = False,
) -> None:
    """Write a Triton Inference Server model repository (text generation, streaming, in-flight batching)."""
    from mistral_export.deploy.kubernetes import write_manifests
    from mistral_export.deploy.repository import package as write_repository
    from mistral_export.deploy.repository import serves_on_gpu

    with user_errors():
        written = write_repository(
            build_dir,
            output,
            name=name,
            max_batch=max_batch,
            instances=instances,
            backend=backend.value if backend else None,
            precision=precision,
            prefill_chunk=prefill_chunk,
            wait=not no_wait,
        )
        if kubernetes:  # the first model written is the one clients call
            written += write_manifests(
                output,
                written[0].name,
                gpu=serves_on_gpu(written[0]),
                image=image,
                replicas=replicas,
                max_replicas=max_replicas,
            )
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
    openai_port: Annotated[
        int,
        typer.Option(help="OpenAI-compatible API port (/v1/completions, /v1/chat/completions, /v1/models); 0: none."),
    ] = 9000,
) -> None:
    """Start Triton Inference Server on REPOSITORY, and the OpenAI-compatible API in front of it; Ctrl-C shuts
    both down cleanly."""
    import signal
    from contextlib import nullcontext

    from mistral_export.deploy.server import Ports, ServerFault, running_server, supervise

    # `kill` stops it as cleanly as Ctrl-C, from the first instant: a SIGTERM while the server loads must stop it too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    ports = Ports(http_port, grpc_port, metrics_port)
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # where the frontend reaches Triton's gRPC
    try:
        with user_errors(), running_server(repository, ports, host) as process:
            if openai_port:
                from mistral_export.deploy.openai_api import running_frontend

                frontend = running_frontend(repository, f"{local}:{ports.grpc}", host, openai_port)
            else:
                frontend = nullcontext()
            with frontend:
                openai = f"  OpenAI http://{host}:{openai_port}/v1" if openai_port else ""
                typer.echo(
                    f"ready: HTTP http://{host}:{ports.http}  gRPC {host}:{ports.grpc}  "
                    f"metrics http://{host}:{ports.metrics}/metrics{openai}  (Ctrl-C stops)",
                    err=True,
                )
                try:
                    supervise(process)
                except ServerFault as fault:
                    typer.echo(f"error: {fault}; stopping the server (restart `mistral-export serve`)", err=True)
                    raise typer.Exit(1) from None
    except KeyboardInterrupt:
        # The server is stopped and its group killed: nothing is left for a second Ctrl-C or `kill` to stop. One that
        # came now (the user pressing again as serve exits) would escape click and end serve as killed by SIGINT.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        typer.echo("stopped tritonserver", err=True)
        return
    if process.returncode not in (0, -signal.SIGTERM):
        typer.echo(f"error: tritonserver exited with code {process.returncode} (its log above says why)", err=True)
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
