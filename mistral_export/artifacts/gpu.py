"""Which GPU a TensorRT engine is for, and whether it runs here (plain Python: no TensorRT needed)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mistral_export.errors import MistralExportError


@dataclass(frozen=True)
class GpuDescription:
    """The facts that decide whether an engine runs here: TensorRT plans are tied to the compute capability and the
    exact TensorRT version they were built with."""

    name: str
    compute_capability: str  # "9.0"
    tensorrt_version: str
    cuda_version: str | None = None

    @property
    def slug(self) -> str:
        return gpu_slug(self.name)

    @property
    def folder_name(self) -> str:
        """One GPU's engines folder: h200-sm90."""
        return f"{self.slug}-sm{self.compute_capability.replace('.', '')}"


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA GeForce RTX 4090' -> 'geforce-rtx-4090'."""
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return re.sub(r"^nvidia-", "", words) or "gpu"


def check_compatible(built: GpuDescription, here: GpuDescription, where: Path | str) -> list[str]:
    """Refuse an engine built for another compute capability or TensorRT version, naming both; returns warnings
    (another GPU model of the same compute capability runs the engine, with tactics timed on the other one)."""
    rebuild = "rebuild it here with `mistral-export build MODEL -o DIR --backend tensorrt`"
    if built.compute_capability != here.compute_capability:
        raise MistralExportError(
            f"{where}: engine built for {built.name} (sm {built.compute_capability}); this machine has {here.name} "
            f"(sm {here.compute_capability}): TensorRT engines run only on the compute capability they were built for; {rebuild}"
        )
    if built.tensorrt_version != here.tensorrt_version:
        raise MistralExportError(
            f"{where}: engine built with TensorRT {built.tensorrt_version}; this machine has TensorRT "
            f"{here.tensorrt_version}: a plan runs only under the TensorRT version that built it; {rebuild}"
        )
    if built.name != here.name:
        return [
            f"{where}: engine built on {built.name}, running on {here.name} (same sm {here.compute_capability}): "
            "it runs, but its tactics were timed on the other GPU"
        ]
    return []
