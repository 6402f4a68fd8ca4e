"""Which precisions a TensorRT engine can run on which GPU, checked before a build does any work."""

from __future__ import annotations

from mistral_export.errors import MistralExportError

# FP8 tensor cores (E4M3 GEMMs) arrived with Ada (sm_89) and Hopper (sm_90); TensorRT refuses FP8 Q/DQ below.
MIN_COMPUTE_CAPABILITY = {"fp8": (8, 9)}


def check_tensorrt_precision(precision: str, gpu_name: str, compute_capability: str) -> None:
    """A clear error when GPU_NAME (COMPUTE_CAPABILITY "major.minor") cannot run a TensorRT engine of PRECISION."""
    needed = MIN_COMPUTE_CAPABILITY.get(precision)
    major, minor = (int(part) for part in compute_capability.split("."))
    if needed is not None and (major, minor) < needed:
        raise MistralExportError(
            f"--precision {precision} --backend tensorrt needs a GPU of compute capability "
            f"{needed[0]}.{needed[1]} or later (Ada, Hopper: FP8 tensor cores); {gpu_name} is sm {compute_capability}. "
            f"Build --backend onnxruntime, or another precision (fp16, int8, int4-awq) for this GPU"
        )
