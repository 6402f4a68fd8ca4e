"""Which artifact a generate model serves, and its runner: chosen from the artifact.json files packaged with it.

A model's version folder holds its artifacts under ARTIFACTS_FOLDER: one ONNX Runtime artifact (artifact.json in the
folder itself), or one TensorRT engine folder per GPU (artifact.json in each), of which the one built for this GPU's
compute capability runs (as Triton's cc_model_filenames would pick it). The runner follows the description's backend
(runners.open_runner): OnnxRuntimeRunner or TensorRTRunner, both with the slot API the in-flight batcher uses.
"""

from __future__ import annotations

from pathlib import Path

from mistral_export.artifacts.description import DESCRIPTION_FILE, ArtifactDescription
from mistral_export.artifacts.folder import Artifact
from mistral_export.errors import MistralExportError

ARTIFACTS_FOLDER = "artifacts"


def packaged_artifacts(folder: Path) -> list[Artifact]:
    """The artifacts under FOLDER (itself or its subfolders), each with its description."""
    folder = Path(folder)
    candidates = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())] if folder.is_dir() else []
    found = [Artifact(f, ArtifactDescription.read(f)) for f in candidates if (f / DESCRIPTION_FILE).is_file()]
    if not found:
        raise MistralExportError(f"{folder}: no {DESCRIPTION_FILE} here or in its subfolders (package again)")
    return found


def served_artifact(folder: Path, compute_capability: str | None) -> Artifact:
    """The artifact to serve from FOLDER on a GPU of COMPUTE_CAPABILITY ("9.0"; None: no GPU)."""
    artifacts = packaged_artifacts(folder)
    engines = [a for a in artifacts if a.backend == "tensorrt"]
    if not engines:
        return artifacts[0]
    built_for = ", ".join(sorted(a.description.tensorrt.compute_capability for a in engines))
    if compute_capability is None:
        raise MistralExportError(
            f"{folder}: TensorRT engines (for compute capability {built_for}) need a GPU; the "
            f"model instance has none (instance_group kind must be KIND_GPU)"
        )
    for engine in engines:
        if engine.description.tensorrt.compute_capability == compute_capability:
            return engine
    raise MistralExportError(
        f"{folder}: no engine for this GPU's compute capability {compute_capability} (engines "
        f"for {built_for}); build one on this GPU and package again"
    )


def open_served_runner(folder: Path, device: int | None, threads: int | None = None):
    """(runner, description) of the artifact FOLDER serves on CUDA device DEVICE (None: CPU)."""
    compute_capability = None
    if device is not None:
        import torch

        major, minor = torch.cuda.get_device_capability(device)
        compute_capability = f"{major}.{minor}"
    artifact = served_artifact(folder, compute_capability)
    if artifact.backend == "tensorrt":
        from mistral_export.runners.tensorrt import TensorRTRunner

        return TensorRTRunner(artifact.folder, device=device), artifact.description
    from mistral_export.runners.onnxruntime import OnnxRuntimeRunner

    # ONNX Runtime's threads sleep between steps: spinning would take the cores from the server's own threads that
    # send each step's tokens (and, on a shared machine, from other jobs: batch-16 steps of the 168M benchmark config
    # took 370 ms instead of 620 ms without spinning, 2 busy cores).
    return OnnxRuntimeRunner(artifact.folder, threads=threads, spinning=False), artifact.description
