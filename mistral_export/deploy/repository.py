"""`mistral-export package`: a Triton model repository from a build folder.

ONNX Runtime layout (runs on the Python-backend-only server of the nvidia-pytriton wheel, or any Triton):

    REPO/NAME/config.pbtxt              Python backend, decoupled, tensorrtllm_backend's text interface
    REPO/NAME/1/model.py                deploy/triton_models/onnxruntime_generate.py
    REPO/NAME/1/tokenizer.json
    REPO/NAME/1/onnxruntime/            the artifact: model.onnx (+ .data), model.ort.onnx, artifact.json

TensorRT layout (needs Triton's full server image: the TensorRT backend):

    REPO/NAME_engine/config.pbtxt       tensorrt_plan, sequence batching, the rolling cache as implicit state
    REPO/NAME_engine/1/<gpu>.plan       one engine per GPU (cc_model_filenames picks by compute capability)
    REPO/NAME/config.pbtxt, 1/model.py  the same text interface as a BLS model driving NAME_engine
    REPO/NAME/1/tokenizer.json, artifact.json

Each model folder is assembled under a temporary name and renamed into place when complete; large
files are hard-linked when the repository is on the build folder's file system, copied otherwise.
One `package` at a time writes into a repository (folder_lock: a second one waits, or refuses).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from mistral_export.artifacts.description import DESCRIPTION_FILE
from mistral_export.artifacts.folder import TOKENIZER_FILE, Artifact, artifacts_of_one_precision, find_artifacts, read_build
from mistral_export.deploy.configs import engine_config, parse_config, text_interface_config
from mistral_export.errors import MistralExportError
from mistral_export.files import write_text_atomic
from mistral_export.folder_lock import folder_lock

TEMPLATES = Path(__file__).parent / "triton_models"
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per prefill step: bounds how long one prefill stalls the decoding batch
ENGINE_SUFFIX = "_engine"


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _write_config(staging: Path, target: Path, text: str) -> None:
    parse_config(text, str(target / "config.pbtxt"))
    (staging / "config.pbtxt").write_text(text)


def _install(staging: Path, target: Path) -> None:
    """Replace `target` by the complete `staging` folder (the old one is removed only after the rename)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old)


def _stage(repository: Path, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=repository))


def package(build_dir: Path, repository: Path, name: str | None = None, max_batch: int = 8, instances: int = 1,
            backend: str | None = None, precision: str | None = None, wait: bool = True) -> list[Path]:
    """Write the model(s) of BUILD_DIR's artifact into REPOSITORY; returns the model folders written.

    Another `package` writing into REPOSITORY: wait for it (said on stderr), or with wait=False refuse."""
    build_dir, repository = Path(build_dir), Path(repository)
    build = read_build(build_dir)
    if max_batch < 1 or instances < 1:
        raise MistralExportError(f"--max-batch and --instances must be at least 1, got {max_batch} and {instances}")
    if not (build_dir / TOKENIZER_FILE).exists():
        raise MistralExportError(f"{build_dir / TOKENIZER_FILE}: missing; the served model needs the tokenizer "
                                 f"(build from a checkpoint folder that has a tokenizer.json)")
    if backend is None:
        backend = "tensorrt" if any(a.backend == "tensorrt" for a in find_artifacts(build_dir, precision)) \
            else "onnxruntime"
    artifacts = artifacts_of_one_precision(build_dir, backend, precision)
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", build["model"]["name"])
    with folder_lock(repository, "package", wait=wait, on_wait=lambda message: print(message, file=sys.stderr)):
        try:
            if backend == "onnxruntime":
                written = [_package_onnxruntime(build_dir, artifacts[0], repository, name, max_batch, instances)]
            else:
                written = _package_tensorrt(build_dir, artifacts, repository, name, max_batch, instances)
        finally:  # an interrupted or refused packaging leaves no half-written model folder
            for staging in repository.glob(f".{name}*.staging-*"):
                shutil.rmtree(staging, ignore_errors=True)
        _write_readme(repository, name, backend)
    return written


def _text_model(build_dir: Path, repository: Path, name: str, template: str, max_batch: int, instances: int,
                kind: str, parameters: dict) -> Path:
    staging = _stage(repository, name)
    version = staging / "1"
    version.mkdir()
    shutil.copyfile(TEMPLATES / template, version / "model.py")
    shutil.copyfile(build_dir / TOKENIZER_FILE, version / TOKENIZER_FILE)
    _write_config(staging, repository / name, text_interface_config(name, max_batch, instances, kind, parameters))
    return staging


def _package_onnxruntime(build_dir: Path, artifact: Artifact, repository: Path, name: str, max_batch: int,
                         instances: int) -> Path:
    parameters = {"artifact": "onnxruntime", "prefill_chunk": DEFAULT_PREFILL_CHUNK, "threads": 0}
    staging = _text_model(build_dir, repository, name, "onnxruntime_generate.py", max_batch, instances,
                          "KIND_CPU", parameters)
    target = staging / "1" / "onnxruntime"
    target.mkdir()
    for file in sorted(artifact.folder.iterdir()):
        if file.is_file() and not file.name.startswith("."):
            _link_or_copy(file, target / file.name)
    _install(staging, repository / name)
    return repository / name


def _package_tensorrt(build_dir: Path, artifacts: list[Artifact], repository: Path, name: str, max_batch: int,
                      instances: int) -> list[Path]:
    plans: dict[str, Path] = {}
    for artifact in artifacts:
        capability = artifact.description.tensorrt.compute_capability
        if capability in plans:
            raise MistralExportError(f"{build_dir}: two engines for compute capability {capability} "
                                     f"({plans[capability].parent.parent.name}, {artifact.folder.parent.name}); "
                                     f"Triton picks an engine by capability: keep one")
        plans[capability] = artifact.folder / artifact.description.file
    core = name + ENGINE_SUFFIX
    first = artifacts[0]
    staging = _stage(repository, core)
    (staging / "1").mkdir()
    files = {}
    for capability, plan in plans.items():
        if not plan.exists():
            raise MistralExportError(f"{plan}: the engine file artifact.json names is missing")
        files[capability] = "model.plan" if len(plans) == 1 else f"{plan.parent.parent.name}.plan"
        _link_or_copy(plan, staging / "1" / files[capability])
    _write_config(staging, repository / core, engine_config(core, first.description, str(first.folder), max_batch, instances, files))
    bls = _text_model(build_dir, repository, name, "tensorrt_generate.py", max_batch, instances, "KIND_CPU",
                      {"engine_model": core, "prefill_chunk": DEFAULT_PREFILL_CHUNK})
    shutil.copyfile(first.folder / DESCRIPTION_FILE, bls / "1" / DESCRIPTION_FILE)
    _install(staging, repository / core)
    _install(bls, repository / name)
    return [repository / name, repository / core]


def _write_readme(repository: Path, name: str, backend: str) -> None:
    if backend == "onnxruntime":
        server = ("This layout needs only Triton's Python backend: `mistral-export serve` runs the `tritonserver`\n"
                  "of the nvidia-pytriton wheel (`pip install 'mistral-export[deploy]'`), or any full server image.")
    else:
        server = (f"`{name}{ENGINE_SUFFIX}` needs Triton's TensorRT backend (the full server image, e.g.\n"
                  f"nvcr.io/nvidia/tritonserver:<yy.mm>-py3, with the TensorRT version the engines were built with)\n"
                  f"and the mistral plugins compiled into the engines (AOT). `{name}` is a Python-backend model.")
    text = f"""# Triton model repository for `{name}`

Written by `mistral-export package`. Start the server:

    mistral-export serve {repository.resolve()}

or by hand, with a Python environment where `mistral-export` is installed first on PATH (the
Python-backend stub imports `mistral_export` through it):

    PATH=/path/to/venv/bin:$PATH tritonserver --model-repository {repository.resolve()}

{server}

Generate (tensorrtllm_backend's text interface: text_input, max_tokens, optional stream,
exclude_input_in_output, min_length, temperature, top_k, top_p, seed, stop_words, bad_words):

    curl -s localhost:8000/v2/models/{name}/generate -d '{{"text_input": "def main(", "max_tokens": 32}}'
    curl -sN localhost:8000/v2/models/{name}/generate_stream -d '{{"text_input": "def main(", "max_tokens": 32, "stream": true}}'

gRPC streaming (`stream_infer`) works too; greedy unless `temperature` > 0.
"""
    write_text_atomic(repository / "README.md", text)
