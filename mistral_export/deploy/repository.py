"""`mistral-export package`: a Triton model repository from a build folder.

One model, one layout for both backends: a decoupled Python-backend model with tensorrtllm_backend's text interface
that runs the artifact in the server's process, in-flight batched over the runner's cache slots
(deploy/triton_models/generate.py, deploy/scheduler.py); the runner is chosen from the packaged artifact.json.

    REPO/NAME/config.pbtxt              Python backend, decoupled; instances KIND_CPU (ONNX Runtime) or KIND_GPU
    REPO/NAME/1/model.py                deploy/triton_models/generate.py
    REPO/NAME/1/tokenizer.json
    REPO/NAME/1/artifacts/              ONNX Runtime: the artifact (model.onnx (+ .data), model.ort.onnx, artifact.json)
    REPO/NAME/1/artifacts/<gpu>-sm<cc>/ TensorRT: model.plan + artifact.json per GPU (the instance's GPU picks one)
    REPO/NAME/1/tokenizer_config.json   the checkpoint's, when it has one (its chat template, for the OpenAI frontend)

The ONNX Runtime layout runs on the Python-backend-only server of the nvidia-pytriton wheel; the TensorRT one needs
TensorRT in the Python environment the server's Python backend runs (the runner loads the plan itself).

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
from mistral_export.artifacts.folder import (
    TOKENIZER_FILE,
    Artifact,
    artifacts_of_one_precision,
    find_artifacts,
    read_build,
)
from mistral_export.deploy.chat_template import TOKENIZER_CONFIG
from mistral_export.deploy.configs import parse_config, text_interface_config
from mistral_export.deploy.served import ARTIFACTS_FOLDER
from mistral_export.errors import MistralExportError
from mistral_export.files import write_text_atomic
from mistral_export.folder_lock import folder_lock

TEMPLATES = Path(__file__).parent / "triton_models"
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per prefill step: bounds how long one prefill stalls the decoding batch


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


def package(
    build_dir: Path,
    repository: Path,
    name: str | None = None,
    max_batch: int = 8,
    instances: int = 1,
    backend: str | None = None,
    precision: str | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    wait: bool = True,
) -> list[Path]:
    """Write the model of BUILD_DIR's artifact into REPOSITORY; returns the model folders written.

    Another `package` writing into REPOSITORY: wait for it (said on stderr), or with wait=False refuse."""
    build_dir, repository = Path(build_dir), Path(repository)
    build = read_build(build_dir)
    if max_batch < 1 or instances < 1 or prefill_chunk < 1:
        raise MistralExportError(
            f"--max-batch, --instances and --prefill-chunk must be at least 1, got {max_batch}, "
            f"{instances} and {prefill_chunk}"
        )
    if not (build_dir / TOKENIZER_FILE).exists():
        raise MistralExportError(
            f"{build_dir / TOKENIZER_FILE}: missing; the served model needs the tokenizer "
            f"(build from a checkpoint folder that has a tokenizer.json)"
        )
    if backend is None:
        backend = (
            "tensorrt" if any(a.backend == "tensorrt" for a in find_artifacts(build_dir, precision)) else "onnxruntime"
        )
    artifacts = artifacts_of_one_precision(build_dir, backend, precision)
    chat_config = _tokenizer_config(build_dir, build)
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", build["model"]["name"])
    repository.mkdir(parents=True, exist_ok=True)
    if backend == "tensorrt":
        check_engine_limits(artifacts, max_batch, prefill_chunk)
    with folder_lock(repository, "package", wait=wait, on_wait=lambda message: print(message, file=sys.stderr)):
        try:
            written = [
                _package(build_dir, artifacts, repository, name, max_batch, instances, prefill_chunk, chat_config)
            ]
        finally:  # an interrupted or refused packaging leaves no half-written model folder
            for staging in repository.glob(f".{name}*.staging-*"):
                shutil.rmtree(staging, ignore_errors=True)
        _write_readme(repository, name, backend)
    return written


def check_engine_limits(artifacts: list[Artifact], max_batch: int, prefill_chunk: int) -> None:
    """Triton's max_batch_size and the prefill chunk must fit every engine's optimization profile (--max-batch and
    --max-chunk at build): a step outside it would fail in the server, request by request."""
    for artifact in artifacts:
        section = artifact.description.tensorrt
        where = f"{artifact.folder}/{DESCRIPTION_FILE}"
        if max_batch > section.max_batch:
            raise MistralExportError(
                f"--max-batch {max_batch} (Triton's max_batch_size) is larger than the engine's "
                f"batch limit {section.max_batch} ({where}: built with --max-batch "
                f"{section.max_batch}); package with --max-batch {section.max_batch} or rebuild"
            )
        if prefill_chunk > section.max_chunk:
            raise MistralExportError(
                f"--prefill-chunk {prefill_chunk} is longer than the engine's longest step "
                f"{section.max_chunk} ({where}: built with --max-chunk {section.max_chunk}); "
                f"package with --prefill-chunk {section.max_chunk} or rebuild"
            )


def _tokenizer_config(build_dir: Path, build: dict) -> Path | None:
    """The checkpoint's tokenizer_config.json (its chat template): in the build folder, or else in the checkpoint
    folder the build records, if it is still there."""
    source = build.get("model", {}).get("source")
    for folder in (build_dir, Path(source) if source and source != "tiny" else None):
        if folder is not None and (folder / TOKENIZER_CONFIG).is_file():
            return folder / TOKENIZER_CONFIG
    return None


def serves_on_gpu(model_folder: Path) -> bool:
    """Whether a packaged generate model runs on GPU instances (the TensorRT layout)."""
    config = parse_config((model_folder / "config.pbtxt").read_text(), str(model_folder / "config.pbtxt"))
    return any(group.kind == group.KIND_GPU for group in config.instance_group)


def _package(
    build_dir: Path,
    artifacts: list[Artifact],
    repository: Path,
    name: str,
    max_batch: int,
    instances: int,
    prefill_chunk: int,
    chat_config: Path | None,
) -> Path:
    tensorrt = artifacts[0].backend == "tensorrt"
    if tensorrt:
        seen: dict[str, Artifact] = {}
        for artifact in artifacts:
            capability = artifact.description.tensorrt.compute_capability
            if capability in seen:
                raise MistralExportError(
                    f"{build_dir}: two engines for compute capability {capability} "
                    f"({seen[capability].folder.parent.name}, {artifact.folder.parent.name}); "
                    f"the server picks an engine by capability: keep one"
                )
            seen[capability] = artifact
            plan = artifact.folder / artifact.description.file
            if not plan.exists():
                raise MistralExportError(f"{plan}: the engine file artifact.json names is missing")
    staging = _stage(repository, name)
    version = staging / "1"
    version.mkdir()
    shutil.copyfile(TEMPLATES / "generate.py", version / "model.py")
    shutil.copyfile(build_dir / TOKENIZER_FILE, version / TOKENIZER_FILE)
    if chat_config is not None:
        shutil.copyfile(chat_config, version / TOKENIZER_CONFIG)
    parameters = {"prefill_chunk": prefill_chunk, "threads": 0}
    config = text_interface_config(name, max_batch, instances, "KIND_GPU" if tensorrt else "KIND_CPU", parameters)
    _write_config(staging, repository / name, config)
    for artifact in artifacts if tensorrt else artifacts[:1]:
        # A TensorRT engine keeps its GPU folder's name (<gpu>-sm<cc>): one per GPU, side by side.
        target = version / ARTIFACTS_FOLDER / (artifact.folder.parent.name if tensorrt else "")
        target.mkdir(parents=True, exist_ok=True)
        for file in sorted(artifact.folder.iterdir()):
            if file.is_file() and not file.name.startswith("."):
                _link_or_copy(file, target / file.name)
    _install(staging, repository / name)
    return repository / name


def _write_readme(repository: Path, name: str, backend: str) -> None:
    if backend == "onnxruntime":
        server = (
            "This layout needs only Triton's Python backend: `mistral-export serve` runs the `tritonserver`\n"
            "of the nvidia-pytriton wheel (`pip install 'mistral-export[deploy]'`), or any full server image."
        )
    else:
        server = (
            f"`{name}` runs the TensorRT engine built for its instance's GPU inside Triton's Python backend:\n"
            f"the Python environment first on PATH needs `mistral-export[tensorrt]` (the TensorRT version the\n"
            f"engines were built with) and a CUDA torch. Its rolling cache stays on the GPU, updated in place."
        )
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
