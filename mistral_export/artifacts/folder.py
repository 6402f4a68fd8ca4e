"""The build folder: where each stage writes, and how artifacts are found again.

    DIR/build.json                                   what was built, from what (hashes), with which options
    DIR/tokenizer.json                               the one tokenizer the runtime side reads
    DIR/onnx/<precision>/model.onnx (+ .data)        portable ONNX of that precision (TensorRT's input)
    DIR/onnx/<precision>/model.ort.onnx, artifact.json the ONNX Runtime artifact of that precision
    DIR/engines/<gpu-slug>-sm<cc>/<precision>/model.plan, artifact.json   a TensorRT engine for one GPU

Validate, deploy and inspect read artifacts only through `find_artifacts`; each artifact's artifact.json is an
`ArtifactDescription` (description.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mistral_export.artifacts.description import DESCRIPTION_FILE, ArtifactDescription
from mistral_export.errors import MistralExportError
from mistral_export.files import read_json

BUILD_FILE = "build.json"
TOKENIZER_FILE = "tokenizer.json"


def onnx_dir(build_dir: Path, precision: str) -> Path:
    return Path(build_dir) / "onnx" / precision


def tensorrt_dir(build_dir: Path, gpu_folder_name: str, precision: str) -> Path:
    return Path(build_dir) / "engines" / gpu_folder_name / precision


@dataclass(frozen=True)
class Artifact:
    folder: Path
    description: ArtifactDescription

    @property
    def backend(self) -> str:
        return self.description.backend

    @property
    def precision(self) -> str:
        return self.description.precision

    @property
    def label(self) -> str:
        return self.description.label


def read_build(build_dir: Path) -> dict:
    build_dir = Path(build_dir)
    if not build_dir.is_dir():
        raise MistralExportError(
            f"{build_dir}: no such build folder (make one with `mistral-export build MODEL -o DIR`)"
        )
    return read_json(build_dir / BUILD_FILE, "build.json (not a build folder? `mistral-export build` writes one)")


def find_artifacts(build_dir: Path, precision: str | None = None, backend: str | None = None) -> list[Artifact]:
    """Every artifact of a build folder (ONNX Runtime first, then TensorRT), optionally of one precision/backend."""
    build_dir = Path(build_dir)
    read_build(build_dir)
    found = []
    for path in sorted(build_dir.glob(f"onnx/*/{DESCRIPTION_FILE}")) + sorted(
        build_dir.glob(f"engines/*/*/{DESCRIPTION_FILE}")
    ):
        artifact = Artifact(path.parent, ArtifactDescription.read(path.parent))
        if (precision is None or artifact.precision == precision) and (backend is None or artifact.backend == backend):
            found.append(artifact)
    if not found:
        missing = " ".join(filter(None, ["no", backend, precision, "artifact"]))
        options = "".join(
            f" --{name} {value}" for name, value in (("precision", precision), ("backend", backend)) if value
        )
        raise MistralExportError(
            f"{build_dir}: {missing} in this build folder "
            f"(`mistral-export build MODEL -o {build_dir}{options}` makes one)"
        )
    return found


def is_build_folder(path: str | Path) -> bool:
    return (Path(path) / BUILD_FILE).is_file()


def artifacts_of_one_precision(build_dir: Path, backend: str, precision: str | None = None) -> list[Artifact]:
    """BACKEND's artifacts of PRECISION, or of the one precision built; several precisions are an error naming them."""
    found = find_artifacts(build_dir, precision, backend)
    precisions = sorted({a.precision for a in found})
    if len(precisions) > 1:
        raise MistralExportError(
            f"{build_dir}: {backend} artifacts of several precisions ({', '.join(precisions)}); "
            "pick one with --precision"
        )
    return found


def select_artifact(build_dir: Path, backend: str, precision: str | None = None) -> Artifact:
    """The one artifact of BACKEND (and PRECISION) to run: an error lists the choices when several precisions fit;
    among TensorRT engines of one precision, the one built for this GPU comes first."""
    found = artifacts_of_one_precision(build_dir, backend, precision)
    if backend == "tensorrt" and len(found) > 1:
        from mistral_export import tensorrt_lib

        if tensorrt_lib.unavailable_reason() is None:
            here = tensorrt_lib.this_gpu().folder_name
            found.sort(key=lambda a: a.folder.parent.name != here)
    return found[0]
