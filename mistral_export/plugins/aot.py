"""Ahead-of-time compilation of the plugin kernels to PTX, for TensorRT's `aot_impl` (no GPU, no TensorRT).

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole pipeline on a CPU-only
machine; only the PTX is kept. TensorRT launches an AOT kernel with its arguments in the order
(input pointers, extra int32 scalars, output pointers), which is the parameter order of
`chunk_attention_kernel` and `rolling_cache_update_kernel`.

Two things Triton adds that TensorRT does not expect are dealt with here:
* Triton ≥ 3.3 appends `global_scratch` / `profile_scratch` pointer parameters to every kernel. These kernels
  use neither (sizes checked to be 0), so the unreferenced trailing parameters are removed from the PTX entry,
  leaving exactly the parameters TensorRT passes.
* The PTX ISA (`.version`) Triton writes is its bundled ptxas's (9.4 for Triton 3.9 on sm_90), and TensorRT hands the
  PTX to the driver, which refuses an ISA newer than its CUDA version knows (CUDA_ERROR_UNSUPPORTED_PTX_VERSION, a
  plugin failure at enqueue). `ptx_isa()` caps it: at the driver's maximum where a driver is loaded, else at
  DEFAULT_PTX_ISA; Triton is then asked for that ISA (its `ptx_version` option; torch_tensorrt caps the same way).
* Only int32 scalars can be passed; the float `scale` is baked into the PTX as a constant instead. The
  `window` scalar is the node's attribute as-is (0: no window, handled in the kernel).

Grids and scalar arguments are written with + - * // only, so the same functions evaluate on Python ints
(tests, torch) and on TensorRT's symbolic shape expressions.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Targets a release build compiles for: Ampere (A100, A10/RTX 30), Ada (L4/L40/RTX 40), Hopper (H100/H200).
SUPPORTED_CAPABILITIES = (80, 86, 89, 90)
AOT_DTYPES = ("fp16", "bf16", "fp32")
# The PTX ISA written when no driver is here to ask: 8.0, what CUDA 12.0 drivers (r525) accept, the oldest that
# TensorRT 10.15+ and 11 run on (CUDA 12.x minor-version compatibility; a CUDA 13.0 driver accepts up to 9.0), and
# the first ISA with sm_90a. `MISTRAL_EXPORT_PTX_ISA` (e.g. 86) overrides it and the driver's.
DEFAULT_PTX_ISA = 80
MIN_TRITON = (3, 3)  # ASTSource(constexprs=..., attrs=...)
# TensorRT's AOT launch sets no dynamic shared-memory attribute, so stay within the default 48 KB limit.
MAX_STATIC_SHARED_MEM = 48 * 1024

ATTENTION_INPUTS = ("q_ptr", "k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr", "past_len_ptr")
ATTENTION_SCALARS = (
    "stride_qb",
    "stride_qh",
    "stride_qs",
    "stride_kb",
    "stride_kh",
    "stride_ks",
    "stride_cb",
    "stride_ch",
    "stride_cc",
    "stride_ob",
    "stride_oh",
    "stride_os",
    "seq_len",
    "capacity",
    "window",
)
ATTENTION_OUTPUTS = ("out_ptr",)

CACHE_UPDATE_INPUTS = ("cache_ptr", "new_ptr", "past_len_ptr", "after_ptr")
CACHE_UPDATE_SCALARS = (
    "stride_cb",
    "stride_ch",
    "stride_cc",
    "stride_nb",
    "stride_nh",
    "stride_ns",
    "seq_len",
    "capacity",
)
CACHE_UPDATE_OUTPUTS = ("cache_out_ptr",)


@dataclass(frozen=True)
class AotTile:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class AotKernel:
    """A compiled kernel and what TensorRT needs to launch it."""

    name: str
    ptx: str
    num_warps: int
    ptx_isa: int  # the PTX's .version as XY (80: 8.0)
    shared_mem: int
    params: tuple[str, ...]  # runtime parameters, in PTX order
    constants: dict[str, Any] = field(default_factory=dict)
    capability: int = 90

    @property
    def block_threads(self) -> int:
        return self.num_warps * 32


def target_capability() -> int:
    """Compute capability (as XY) that AOT kernels are compiled for."""
    override = os.environ.get("MISTRAL_EXPORT_CUDA_ARCH")
    if override:
        return int(override.removeprefix("sm_"))
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device to compile the AOT kernels for; set MISTRAL_EXPORT_CUDA_ARCH (e.g. 90)")
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def driver_ptx_isa() -> int | None:
    """The newest PTX ISA the loaded CUDA driver accepts (XY), or None where there is no driver.

    Read from the driver's CUDA version (cuDriverGetVersion through ctypes: no CUDA context, no toolkit) and mapped
    with Triton's own CUDA-version-to-ISA table (triton.backends.nvidia.compiler.ptx_get_version)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return isa_of_cuda_version(version.value)


def isa_of_cuda_version(version: int) -> int:
    """The newest PTX ISA a CUDA version (the driver API's integer: 13000 for 13.0) accepts, as Triton maps it."""
    from triton.backends.nvidia.compiler import ptx_get_version

    return ptx_get_version(f"{version // 1000}.{version % 1000 // 10}")


@functools.cache
def triton_ptx_isa(capability: int) -> int | None:
    """The ISA Triton writes by default for this target (its bundled ptxas's), or None where that is unknown."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version

        return ptx_get_version(get_ptxas(capability).version)
    except Exception:  # noqa: BLE001 - Triton internals moved: the cap below then stands alone
        return None


def ptx_isa(capability: int) -> int:
    """The PTX ISA the AOT kernels for `capability` are written in: the driver's maximum (DEFAULT_PTX_ISA where no
    driver is loaded, MISTRAL_EXPORT_PTX_ISA where set), never above what Triton's ptxas writes."""
    override = os.environ.get("MISTRAL_EXPORT_PTX_ISA")
    limit = int(override) if override else (driver_ptx_isa() or DEFAULT_PTX_ISA)
    written = triton_ptx_isa(capability)
    return limit if written is None else min(limit, written)


def ptx_version_of(ptx: str) -> int:
    """`.version 8.0` of a PTX text as 80."""
    match = re.search(r"^\s*\.version\s+(\d+)\.(\d+)", ptx, flags=re.M)
    if match is None:
        raise RuntimeError("no .version line in the PTX")
    return int(match.group(1)) * 10 + int(match.group(2))


def check_triton(version: str) -> None:
    """A clear error where Triton is older than the AOT compilation needs."""
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < MIN_TRITON:
        raise RuntimeError(
            f"compiling the AOT plugin kernels needs triton >= {'.'.join(map(str, MIN_TRITON))} "
            f"(ASTSource constexprs/attrs); found {version}: pip install 'triton>=3.3'"
        )


def _check_dtype(dtype: str) -> None:
    if dtype not in AOT_DTYPES:
        raise ValueError(f"dtype must be one of {AOT_DTYPES}; got {dtype!r}")


def _check_head_dim(head_dim: int) -> None:
    from .kernels import SUPPORTED_HEAD_DIMS

    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}; got {head_dim}")


def _check_capability(capability: int) -> None:
    if capability not in SUPPORTED_CAPABILITIES:
        raise ValueError(f"capability must be one of {SUPPORTED_CAPABILITIES} (sm_XY as XY); got {capability}")


def cdiv(a, b):
    """Ceiling division that also works on TensorRT shape expressions (they support + - * //)."""
    return (a + (b - 1)) // b


def chunk_attention_tile(dtype: str, head_dim: int) -> AotTile:
    """Tiles whose shared memory fits 48 KB on every supported target (checked by tests/test_aot_ptx.py)."""
    _check_dtype(dtype)
    _check_head_dim(head_dim)
    if dtype == "fp32":
        return AotTile(block_m=32, block_n=32 if head_dim >= 128 else 64, num_warps=4, num_stages=1)
    if head_dim >= 128:
        return AotTile(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return AotTile(block_m=64, block_n=64, num_warps=4, num_stages=2)


def _torch_dtype(dtype: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def _ptx_entry(ptx: str, name: str) -> re.Match:
    """The `.entry name(...)` of the PTX; group 1 is its parameter list."""
    entry = re.search(r"\.entry\s+" + re.escape(name) + r"\(\s*(.*?)\s*\)", ptx, flags=re.S)
    if entry is None:
        raise RuntimeError(f"no .entry {name} in the PTX")
    return entry


def _strip_unused_trailing_params(ptx: str, name: str, keep: int) -> str:
    """Drops the entry parameters after the first `keep`, which must be unreferenced in the body."""
    entry = _ptx_entry(ptx, name)
    params = [p.strip() for p in entry.group(1).split(",")]
    if len(params) < keep:
        raise RuntimeError(f"{name} has {len(params)} PTX parameters, fewer than the {keep} TensorRT passes")
    extra = params[keep:]
    for decl in extra:
        pname = decl.split()[-1]
        if len(re.findall(re.escape(pname) + r"\b", ptx)) != 1:
            raise RuntimeError(f"{name}: trailing parameter {pname} is used by the kernel; cannot drop it")
    if not extra:
        return ptx
    new_block = ",\n\t".join(params[:keep])
    return ptx[: entry.start(1)] + new_block + ptx[entry.end(1) :]


def ptx_entry_params(ptx: str, name: str) -> list[str]:
    """Parameter declarations of the PTX entry `name` (used by tests to check the launch contract)."""
    return [p.strip() for p in _ptx_entry(ptx, name).group(1).split(",") if p.strip()]


def _compile(
    fn,
    signature: dict[str, str],
    constants: dict[str, Any],
    aligned: Sequence[str],
    capability: int,
    num_warps: int,
    num_stages: int,
    n_runtime: int,
) -> AotKernel:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    check_triton(triton.__version__)
    names = list(fn.arg_names)
    full_sig = {n: ("constexpr" if n in constants else signature[n]) for n in names}
    # 16-byte alignment of pointers and strides lets Triton vectorise loads; TensorRT buffers are 256-aligned
    # and every stride is a multiple of head_dim >= 16.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=full_sig, constexprs=constants, attrs=attrs)
    isa = ptx_isa(capability)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": num_warps, "num_stages": num_stages, "ptx_version": isa},
    )
    md = compiled.metadata
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        if getattr(md, scratch, 0):
            raise RuntimeError(f"{md.name} needs {scratch}={getattr(md, scratch)}; TensorRT cannot provide it")
    ptx = _strip_unused_trailing_params(compiled.asm["ptx"], md.name, n_runtime)
    runtime = tuple(n for n in names if n not in constants)
    return AotKernel(
        name=md.name,
        ptx=ptx,
        num_warps=md.num_warps,
        ptx_isa=ptx_version_of(ptx),
        shared_mem=md.shared,
        params=runtime,
        constants=dict(constants),
        capability=capability,
    )


def compile_chunk_attention(dtype: str, head_dim: int, group: int, scale: float, capability: int) -> AotKernel:
    """PTX of `chunk_attention_kernel` for one I/O dtype, head_dim, GQA group size and scale."""
    from .kernels import LOG2E, chunk_attention_kernel, dot_precision

    _check_dtype(dtype)
    _check_head_dim(head_dim)
    _check_capability(capability)
    if group < 1:
        raise ValueError(f"group (q heads per kv head) must be >= 1; got {group}")
    tile = chunk_attention_tile(dtype, head_dim)
    ptr = f"*{dtype}"
    signature = {n: ptr for n in ATTENTION_INPUTS + ATTENTION_OUTPUTS}
    signature["past_len_ptr"] = "*i64"
    signature.update({n: "i32" for n in ATTENTION_SCALARS})
    constants = {
        "scale_log2": float(scale) * LOG2E,
        "GROUP": group,
        "BLOCK_M": tile.block_m,
        "BLOCK_N": tile.block_n,
        "HEAD_DIM": head_dim,
        "DOT_PRECISION": dot_precision(_torch_dtype(dtype)),
    }
    aligned = [n for n in ATTENTION_INPUTS + ATTENTION_OUTPUTS if n != "past_len_ptr"]
    aligned += [n for n in ATTENTION_SCALARS if n.startswith("stride_")]
    n_runtime = len(ATTENTION_INPUTS) + len(ATTENTION_SCALARS) + len(ATTENTION_OUTPUTS)
    return _compile(
        chunk_attention_kernel, signature, constants, aligned, capability, tile.num_warps, tile.num_stages, n_runtime
    )


def chunk_attention_grid(batch, kv_heads: int, seq, group: int, tile: AotTile):
    """Launch grid of `chunk_attention_kernel` (the same as kernels.sliding_window_attention's for S > 1)."""
    return (cdiv(seq * group, tile.block_m), kv_heads, batch)


def chunk_attention_scalars(q_heads: int, kv_heads: int, seq, capacity: int, head_dim: int, window: int) -> list:
    """The int32 scalars of `chunk_attention_kernel` for contiguous (LINEAR) tensors, in ATTENTION_SCALARS order."""
    # `seq` may be a TensorRT expression: keep it on the left of each product.
    q_strides = [seq * (q_heads * head_dim), seq * head_dim, head_dim]
    kv_strides = [seq * (kv_heads * head_dim), seq * head_dim, head_dim]
    cache_strides = [kv_heads * capacity * head_dim, capacity * head_dim, head_dim]
    return [*q_strides, *kv_strides, *cache_strides, *q_strides, seq, capacity, window]


def compile_rolling_cache_update(dtype: str, head_dim: int, capability: int) -> AotKernel:
    """PTX of `rolling_cache_update_kernel` (cache and new share `dtype`)."""
    from .kernels import CACHE_COPY_ROWS, CACHE_UPDATE_BLOCK_ROWS, rolling_cache_update_kernel

    _check_dtype(dtype)
    _check_head_dim(head_dim)
    _check_capability(capability)
    ptr = f"*{dtype}"
    signature = {n: ptr for n in CACHE_UPDATE_INPUTS + CACHE_UPDATE_OUTPUTS}
    signature["past_len_ptr"] = "*i64"
    signature.update({n: "i32" for n in CACHE_UPDATE_SCALARS})
    constants = {"BLOCK_R": CACHE_UPDATE_BLOCK_ROWS, "HEAD_DIM": head_dim, "COPY_ROWS": CACHE_COPY_ROWS}
    aligned = ["cache_ptr", "new_ptr", "cache_out_ptr"] + [n for n in CACHE_UPDATE_SCALARS if n.startswith("stride_")]
    n_runtime = len(CACHE_UPDATE_INPUTS) + len(CACHE_UPDATE_SCALARS) + len(CACHE_UPDATE_OUTPUTS)
    return _compile(
        rolling_cache_update_kernel, signature, constants, aligned, capability, 4 if head_dim >= 64 else 1, 1, n_runtime
    )


def rolling_cache_update_grid(batch, kv_heads: int, seq, capacity: int):
    """The torch launcher's grid (kernels.cache_update_grid): the new rows, then the copy of the other slots, which
    returns at once where TensorRT aliases the output to the input."""
    from .kernels import cache_update_grid

    return cache_update_grid(batch, kv_heads, seq, capacity)


def rolling_cache_update_scalars(kv_heads: int, seq, capacity: int, head_dim: int) -> list:
    """The int32 scalars of `rolling_cache_update_kernel` for contiguous tensors, in CACHE_UPDATE_SCALARS order."""
    cache_strides = [kv_heads * capacity * head_dim, capacity * head_dim, head_dim]
    new_strides = [seq * (kv_heads * head_dim), seq * head_dim, head_dim]  # seq may be an expression
    return [*cache_strides, *new_strides, seq, capacity]


INT32_RANGE = (-(2**31), 2**31 - 1)


def launch_arguments(kernel: AotKernel, pointers: dict[str, int], scalars: Sequence[int]) -> tuple[tuple, tuple]:
    """The kernel's arguments as TensorRT passes them to an AOT plugin kernel, as cuda-python's cuLaunchKernel takes
    them ((values), (ctypes types)): every input pointer, the extra int32 scalars, every output pointer, in the
    kernel's parameter order. POINTERS maps the pointer parameters' names to device addresses; SCALARS are the values
    the plugin's aot_impl returns (chunk_attention_scalars, rolling_cache_update_scalars), in order.

    Used by benchmarks/aot_driver_check.py to launch the PTX through the CUDA driver API exactly as TensorRT would."""
    pointer_names = [n for n in kernel.params if n.endswith("_ptr")]
    scalar_names = [n for n in kernel.params if not n.endswith("_ptr")]
    if sorted(pointers) != sorted(pointer_names):
        raise ValueError(f"{kernel.name} takes the pointers {pointer_names}; got {sorted(pointers)}")
    if len(scalars) != len(scalar_names):
        raise ValueError(f"{kernel.name} takes {len(scalar_names)} int32 scalars {scalar_names}; got {len(scalars)}")
    given = dict(zip(scalar_names, scalars, strict=True))
    for name, value in given.items():
        if not isinstance(value, int) or not INT32_RANGE[0] <= value <= INT32_RANGE[1]:
            raise ValueError(f"{kernel.name}: scalar {name} = {value!r} is not an int32")
    values = tuple(pointers[n] if n in pointers else given[n] for n in kernel.params)
    types = tuple(ctypes.c_void_p if n in pointers else ctypes.c_int32 for n in kernel.params)
    return values, types
