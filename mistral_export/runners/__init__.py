"""Runners: one interface (base.Runner: a batch of sequences sharing one rolling cache) over every backend, the
eager model, ONNX Runtime artifacts and TensorRT engines. Runners read artifacts only: they import neither the
exporter nor the build pipeline (tests/test_layering.py)."""

from __future__ import annotations

from mistral_export.artifacts.folder import Artifact


def open_runner(artifact: Artifact, threads: int | None = None, providers: list[str] | None = None):
    """A Runner over an artifact of a build folder."""
    if artifact.backend == "onnxruntime":
        from mistral_export.runners.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(artifact.folder, threads=threads, providers=providers)
    from mistral_export.runners.tensorrt import TensorRTRunner

    return TensorRTRunner(artifact.folder)
