"""The one module that imports TensorRT (lazily, inside functions): whether it is usable here, the module itself,
and the GPU an engine would be built for. Everything else reaches TensorRT through `require_tensorrt`, so a
machine without TensorRT imports the whole package and gets one clear error where TensorRT is really needed."""

from __future__ import annotations

from mistral_export.artifacts.gpu import GpuDescription
from mistral_export.errors import MistralExportError

INSTALL_HINT = "pip install 'mistral-export[tensorrt]'"
# ICudaEngine.get_aliased_input_tensor (the runner's aliasing check) arrives in 10.15; tensorrt.plugin's aot_impl,
# KernelLaunchParams and SymInt32 (the AOT plugins) in 10.9.
MIN_TENSORRT = (10, 15)


def too_old(version: str) -> str | None:
    """Why TensorRT VERSION cannot run this project's engines, or None when it is new enough."""
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return f"TensorRT's version {version!r} is not a version number"
    if found < MIN_TENSORRT:
        return (
            f"TensorRT {version} is older than {'.'.join(map(str, MIN_TENSORRT))} (get_aliased_input_tensor, "
            f"the AOT plugin API)"
        )
    return None


def unavailable_reason() -> str | None:
    """Why a TensorRT engine cannot be built or run here, or None when TensorRT and a CUDA GPU are both present."""
    try:
        import tensorrt
    except ImportError:
        return "TensorRT is not installed (no `tensorrt` Python package)"
    except OSError as exc:  # the bindings are there, the libraries they load are not
        return f"TensorRT's Python bindings cannot load its libraries ({exc})"
    old = too_old(tensorrt.__version__)
    if old:
        return old
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def require_tensorrt(what: str):
    """The `tensorrt` module, or an error saying WHAT needs it, why it is unavailable and how to install it."""
    reason = unavailable_reason()
    if reason:
        raise MistralExportError(f"{what} needs TensorRT and a CUDA GPU: {reason}; install it with {INSTALL_HINT}")
    import tensorrt as trt

    return trt


def this_gpu(device: int = 0) -> GpuDescription:
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return GpuDescription(torch.cuda.get_device_name(device), f"{major}.{minor}", trt.__version__, torch.version.cuda)
