"""TensorRT Quickly-Deployable-Plugin definitions of the `mistral` ops; importing this module registers them.

This is the only module of the package that imports `tensorrt`. The ONNX nodes `SlidingWindowAttention` and
`RollingCacheUpdate` (domain `mistral`, attribute `plugin_namespace="mistral"`) bind to these plugins in
TensorRT's ONNX parser. Both implementations are registered, so each node (attribute `aot`: 1 ahead-of-time, 0
JIT) or the network (NetworkDefinitionCreationFlag PREFER_AOT_PYTHON_PLUGINS / PREFER_JIT_PYTHON_PLUGINS) must say
which one, or TensorRT's plugin creator refuses the node. The AOT kernel's PTX is stored in the engine, so it runs
without Python (trtexec, Triton Inference Server's TensorRT backend).

* `mistral::SlidingWindowAttention` (q, k, v, k_cache, v_cache, past_len; window: int, scale: float) -> out.
  AOT: `chunk_attention_kernel` for every S (decode too: one kernel per plugin is all `aot_impl` can return, so
  the split decode path of the JIT implementation is not available there).
* `mistral::RollingCacheUpdate` (cache, new, past_len, after) -> cache_out, declared aliased to `cache` (in place,
  no copy, with PreviewFeature.ALIASED_PLUGIN_IO_10_03). Where TensorRT gives cache_out its own buffer anyway
  (the flag off, Polygraphy's TrtRunner, trtexec), the same kernel copies the old slots into it too. `after` (the
  same layer's attention output) is an input only so that TensorRT orders the update after the attention that reads
  the old cache; it is never read.

The AOT target is the GPU the engine is built on (engines are per GPU), or `MISTRAL_EXPORT_CUDA_ARCH` (e.g. 89).
"""

# No `from __future__ import annotations` here: tensorrt.plugin validates these functions' annotations as objects
# (the register functions' TensorDesc inputs, the aot_impl return type), and string annotations fail its checks.
# Annotations it does not require are left off.
from typing import List, Tuple, Union

import tensorrt as trt
import tensorrt.plugin as trtp

from mistral_export.op_contract import ATTENTION_OP, CACHE_UPDATE_OP, PLUGIN_NAMESPACE

from . import aot

# The names the exported nodes carry (op_type, plugin_namespace), so the parser binds them to these plugins.
ATTENTION_PLUGIN = f"{PLUGIN_NAMESPACE}::{ATTENTION_OP}"
CACHE_UPDATE_PLUGIN = f"{PLUGIN_NAMESPACE}::{CACHE_UPDATE_OP}"

_IO_TYPES = "FP16|BF16|FP32"
# What an aot_impl returns (tensorrt.plugin requires this return annotation): kernel name, PTX, launch
# parameters, and the kernel's scalar arguments.
_AotKernelLaunch = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]
_TRT_TO_AOT_DTYPE = {trt.float16: "fp16", trt.bfloat16: "bf16", trt.float32: "fp32"}


def _static_dim(desc: trtp.TensorDesc, index: int, what: str) -> int:
    expr = desc.shape_expr[index]
    if not expr.is_constant:
        raise ValueError(f"{what} (dim {index}) must be static in the network to compile the plugin kernel")
    return int(expr.constant_value())


def _aot_dtype(desc: trtp.TensorDesc, name: str) -> str:
    if desc.dtype not in _TRT_TO_AOT_DTYPE:
        raise ValueError(f"{name} must be FP16, BF16 or FP32; got {desc.dtype}")
    return _TRT_TO_AOT_DTYPE[desc.dtype]


def _launch_params(kernel: aot.AotKernel, grid) -> trtp.KernelLaunchParams:
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = grid
    params.block_x = kernel.block_threads
    params.shared_mem = kernel.shared_mem
    return params


def _sym_int32s(values) -> trtp.SymIntExprs:
    return trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in values])


# --------------------------------------------------------------------------------------------------------------
# SlidingWindowAttention
# --------------------------------------------------------------------------------------------------------------


@trtp.register(ATTENTION_PLUGIN)
def _attention_desc(
    q: trtp.TensorDesc,
    k: trtp.TensorDesc,
    v: trtp.TensorDesc,
    k_cache: trtp.TensorDesc,
    v_cache: trtp.TensorDesc,
    past_len: trtp.TensorDesc,
    window: int,
    scale: float,
) -> trtp.TensorDesc:
    return q.like()


@trtp.autotune(ATTENTION_PLUGIN)
def _attention_autotune(q, k, v, k_cache, v_cache, past_len, outputs) -> List[trtp.AutoTuneCombination]:
    t = _IO_TYPES
    return [trtp.AutoTuneCombination(f"{t}, {t}, {t}, {t}, {t}, INT64, {t}")]


@trtp.aot_impl(ATTENTION_PLUGIN)
def _attention_aot(q, k, v, k_cache, v_cache, past_len, window, scale, outputs, tactic) -> _AotKernelLaunch:
    q_heads = _static_dim(q, 1, "q heads")
    head_dim = _static_dim(q, 3, "q head_dim")
    kv_heads = _static_dim(k, 1, "k heads")
    capacity = _static_dim(k_cache, 2, "k_cache capacity")
    if q_heads % kv_heads:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    group = q_heads // kv_heads
    dtype = _aot_dtype(q, "q")
    kernel = aot.compile_chunk_attention(dtype, head_dim, group, float(scale), aot.target_capability())
    tile = aot.chunk_attention_tile(dtype, head_dim)
    batch, seq = q.shape_expr[0], q.shape_expr[2]
    grid = aot.chunk_attention_grid(batch, kv_heads, seq, group, tile)
    scalars = aot.chunk_attention_scalars(q_heads, kv_heads, seq, capacity, head_dim, int(window))
    return kernel.name, kernel.ptx, _launch_params(kernel, grid), _sym_int32s(scalars)


@trtp.impl(ATTENTION_PLUGIN)
def _attention_impl(q, k, v, k_cache, v_cache, past_len, window: int, scale: float, outputs, stream: int) -> None:
    import torch

    from . import kernels

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        t = [torch.as_tensor(x, device="cuda") for x in (q, k, v, k_cache, v_cache, past_len)]
        out = torch.as_tensor(outputs[0], device="cuda")
        kernels.sliding_window_attention(*t, int(window), float(scale), out=out)


# --------------------------------------------------------------------------------------------------------------
# RollingCacheUpdate
# --------------------------------------------------------------------------------------------------------------


@trtp.register(CACHE_UPDATE_PLUGIN)
def _cache_update_desc(
    cache: trtp.TensorDesc,
    new: trtp.TensorDesc,
    past_len: trtp.TensorDesc,
    after: trtp.TensorDesc,
) -> trtp.TensorDesc:
    return cache.aliased()


@trtp.autotune(CACHE_UPDATE_PLUGIN)
def _cache_update_autotune(cache, new, past_len, after, outputs) -> List[trtp.AutoTuneCombination]:
    t = _IO_TYPES
    return [trtp.AutoTuneCombination(f"{t}, {t}, INT64, {t}, {t}")]


@trtp.aot_impl(CACHE_UPDATE_PLUGIN)
def _cache_update_aot(cache, new, past_len, after, outputs, tactic) -> _AotKernelLaunch:
    kv_heads = _static_dim(cache, 1, "cache heads")
    capacity = _static_dim(cache, 2, "cache capacity")
    head_dim = _static_dim(cache, 3, "cache head_dim")
    kernel = aot.compile_rolling_cache_update(_aot_dtype(cache, "cache"), head_dim, aot.target_capability())
    batch, seq = new.shape_expr[0], new.shape_expr[2]
    grid = aot.rolling_cache_update_grid(batch, kv_heads, seq, capacity)
    scalars = aot.rolling_cache_update_scalars(kv_heads, seq, capacity, head_dim)
    return kernel.name, kernel.ptx, _launch_params(kernel, grid), _sym_int32s(scalars)


@trtp.impl(CACHE_UPDATE_PLUGIN)
def _cache_update_impl(cache, new, past_len, after, outputs, stream: int) -> None:
    import torch

    from . import kernels

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        cache = torch.as_tensor(cache, device="cuda")
        cache_out = torch.as_tensor(outputs[0], device="cuda")
        # In place where TensorRT aliases the output to `cache`; else the kernel copies the old slots too.
        kernels.rolling_cache_update(
            cache,
            torch.as_tensor(new, device="cuda"),
            torch.as_tensor(past_len, device="cuda"),
            out=None if cache_out.data_ptr() == cache.data_ptr() else cache_out,
        )
