"""The build folder: where each stage writes, what `engine.json` records, and how artifacts are found again.

    DIR/build.json                                   what was built, from what (hashes), with which options
    DIR/tokenizer.json                               the one tokenizer the runtime side reads
    DIR/onnx/<precision>/model.onnx (+ .data)        portable ONNX of that precision (TensorRT's input)
    DIR/onnx/<precision>/model.ort.onnx, engine.json the ONNX Runtime artifact of that precision
    DIR/engines/<gpu-slug>-sm<cc>/<precision>/model.plan, engine.json   a TensorRT engine for one GPU

`engine.json` is the same document for both backends (backend-specific details under the backend's
own key); validate, deploy and inspect read artifacts only through `find_artifacts`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from mistral_export.errors import MistralExportError
from mistral_export.model.config import ModelConfig, from_hf_config

BUILD_FILE = "build.json"
ENGINE_FILE = "engine.json"
TOKENIZER_FILE = "tokenizer.json"
ENGINE_FORMAT = 1


def onnx_dir(build_dir: Path, precision: str) -> Path:
    return Path(build_dir) / "onnx" / precision


def tensorrt_folder_name(gpu_slug: str, capability: str) -> str:
    """One GPU's engines folder: h200-sm90."""
    return f"{gpu_slug}-sm{capability.replace('.', '')}"


def tensorrt_dir(build_dir: Path, gpu_slug: str, capability: str, precision: str) -> Path:
    return Path(build_dir) / "engines" / tensorrt_folder_name(gpu_slug, capability) / precision


@dataclass(frozen=True)
class Artifact:
    folder: Path
    engine: dict  # the engine.json document

    @property
    def backend(self) -> str:
        return self.engine["backend"]

    @property
    def precision(self) -> str:
        return self.engine["precision"]

    @property
    def config(self) -> ModelConfig:
        """The model config the artifact was built from (engine.json's copy)."""
        return from_hf_config(self.folder / ENGINE_FILE, json.dumps(self.engine["model"]["config"]))

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.precision}" + (
            f"@{self.engine['tensorrt']['gpu_slug']}" if self.backend == "tensorrt" else "")


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, document: dict) -> None:
    write_text_atomic(path, json.dumps(document, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str) -> dict:
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MistralExportError(f"{path}: no {what} here") from None
    except json.JSONDecodeError as exc:
        raise MistralExportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise MistralExportError(f"{path}: expected a JSON object")
    return document


def read_build(build_dir: Path) -> dict:
    build_dir = Path(build_dir)
    if not build_dir.is_dir():
        raise MistralExportError(f"{build_dir}: no such build folder (make one with `mistral-export build MODEL -o DIR`)")
    return read_json(build_dir / BUILD_FILE, "build.json (not a build folder? `mistral-export build` writes one)")


def read_engine(folder: Path) -> dict:
    document = read_json(Path(folder) / ENGINE_FILE, ENGINE_FILE)
    if document.get("format") != ENGINE_FORMAT or document.get("backend") not in ("onnxruntime", "tensorrt"):
        raise MistralExportError(f"{Path(folder) / ENGINE_FILE}: not an engine description of this tool "
                                 f"(format {ENGINE_FORMAT}, backend onnxruntime or tensorrt)")
    return document


def find_artifacts(build_dir: Path, precision: str | None = None, backend: str | None = None) -> list[Artifact]:
    """Every artifact of a build folder (ONNX Runtime first, then TensorRT), optionally of one precision/backend."""
    build_dir = Path(build_dir)
    read_build(build_dir)
    found = []
    for path in sorted(build_dir.glob(f"onnx/*/{ENGINE_FILE}")) + sorted(build_dir.glob(f"engines/*/*/{ENGINE_FILE}")):
        artifact = Artifact(path.parent, read_engine(path.parent))
        if (precision is None or artifact.precision == precision) and (backend is None or artifact.backend == backend):
            found.append(artifact)
    if not found:
        missing = " ".join(filter(None, ["no", backend, precision, "artifact"]))
        options = "".join(f" --{name} {value}" for name, value in (("precision", precision), ("backend", backend)) if value)
        raise MistralExportError(f"{build_dir}: {missing} in this build folder "
                                 f"(`mistral-export build MODEL -o {build_dir}{options}` makes one)")
    return found


def is_build_folder(path: str | Path) -> bool:
    return (Path(path) / BUILD_FILE).is_file()


def artifacts_of_one_precision(build_dir: Path, backend: str, precision: str | None = None) -> list[Artifact]:
    """BACKEND's artifacts of PRECISION, or of the one precision built; several precisions are an error naming them."""
    found = find_artifacts(build_dir, precision, backend)
    precisions = sorted({a.precision for a in found})
    if len(precisions) > 1:
        raise MistralExportError(f"{build_dir}: {backend} artifacts of several precisions ({', '.join(precisions)}); "
                                 "pick one with --precision")
    return found


def select_artifact(build_dir: Path, backend: str, precision: str | None = None) -> Artifact:
    """The one artifact of BACKEND (and PRECISION) to run: an error lists the choices when several precisions fit;
    among TensorRT engines of one precision, the one built for this GPU comes first."""
    found = artifacts_of_one_precision(build_dir, backend, precision)
    if backend == "tensorrt" and len(found) > 1:
        from mistral_export.engines import tensorrt_engine

        if tensorrt_engine.unavailable_reason() is None:
            here = tensorrt_engine.this_gpu().folder_name
            found.sort(key=lambda a: a.folder.parent.name != here)
    return found[0]


def open_runner(artifact: Artifact, threads: int | None = None, providers: list[str] | None = None):
    """A Runner (engines/runner.py) over an artifact."""
    if artifact.backend == "onnxruntime":
        from mistral_export.engines.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(artifact.folder / "model.onnx", threads=threads, providers=providers)
    from mistral_export.engines import tensorrt_engine  # the one module that needs TensorRT

    return tensorrt_engine.TensorRTRunner(artifact.folder)
