"""AOT compilation of the plugin kernels to PTX for sm_80/86/89/90, on a machine with no GPU.

Checks what TensorRT's `aot_impl` relies on: the PTX entry is the reported kernel name, its parameters are
exactly (inputs, int32 scalars, outputs) in that order, the block size is num_warps * 32 (the PTX's .reqntid),
shared memory fits the 48 KB TensorRT can launch with, the grid/scalars match the tensors' layout, and the PTX ISA
(`.version`) is one a CUDA 13.0 driver (580.x) accepts: at most 9.0, and here, with no driver, DEFAULT_PTX_ISA (8.0,
what every driver TensorRT 10.15+ runs on accepts) where Triton 3.9 alone would write 9.4.
Every tile configuration `aot_impl` can pick is covered: tiles depend on the dtype and on head_dim >= 128, so
head_dims 32 and 128 cover them all (16 and 64 are compiled too under the `slow` marker).
"""

from __future__ import annotations

import functools
import os
import re

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("AOT compilation needs triton's compiler, not the interpreter", allow_module_level=True)

from mistral_export.op_contract import NO_WINDOW  # noqa: E402
from mistral_export.plugins import aot  # noqa: E402

CAPABILITIES = aot.SUPPORTED_CAPABILITIES
DTYPES = aot.AOT_DTYPES
# 32 and 128 reach every tile configuration; 16 and 64 are compiled too under the `slow` marker.
HEAD_DIMS = [32, 128, *(pytest.param(d, marks=pytest.mark.slow) for d in (16, 64))]
CUDA_13_0_DRIVER_ISA = 90  # the newest PTX ISA a CUDA 13.0 driver (580.x) loads


@functools.cache
def chunk_kernel(dtype: str, head_dim: int, group: int, capability: int) -> aot.AotKernel:
    return aot.compile_chunk_attention(dtype, head_dim, group, head_dim**-0.5, capability)


@functools.cache
def cache_kernel(dtype: str, head_dim: int, capability: int) -> aot.AotKernel:
    return aot.compile_rolling_cache_update(dtype, head_dim, capability)


def check_launch_contract(kernel: aot.AotKernel, inputs, scalars, outputs, dtype: str) -> None:
    ptx = kernel.ptx
    arch = f"sm_{kernel.capability}" + ("a" if kernel.capability == 90 else "")
    assert re.search(rf"^\.target {arch}\b", ptx, flags=re.M), f"PTX is not for {arch}"
    assert re.search(rf"\.visible \.entry {re.escape(kernel.name)}\(", ptx), "kernel name is not the PTX entry"

    params = aot.ptx_entry_params(ptx, kernel.name)
    assert kernel.params == tuple(inputs) + tuple(scalars) + tuple(outputs)
    assert len(params) == len(kernel.params), "PTX must take exactly the arguments TensorRT passes"
    kinds = ["ptr"] * len(inputs) + ["i32"] * len(scalars) + ["ptr"] * len(outputs)
    for decl, kind in zip(params, kinds):
        assert (".u64 .ptr" in decl) if kind == "ptr" else (".u32" in decl or ".b32" in decl), decl

    versions = re.findall(r"^\.version (\d+)\.(\d+)$", ptx, flags=re.M)
    assert len(versions) == 1, "one .version line"
    isa = int(versions[0][0]) * 10 + int(versions[0][1])
    assert isa == kernel.ptx_isa == aot.ptx_isa(kernel.capability) <= CUDA_13_0_DRIVER_ISA
    if aot.driver_ptx_isa() is None and not os.environ.get("MISTRAL_EXPORT_PTX_ISA"):
        assert isa == aot.DEFAULT_PTX_ISA

    reqntid = re.search(r"\.reqntid (\d+)", ptx)
    assert reqntid is not None and int(reqntid.group(1)) == kernel.block_threads == kernel.num_warps * 32
    assert 0 <= kernel.shared_mem <= aot.MAX_STATIC_SHARED_MEM
    assert "global_smem" in ptx or kernel.shared_mem == 0


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_chunk_attention_ptx(capability, dtype, head_dim):
    kernel = chunk_kernel(dtype, head_dim, 4, capability)
    check_launch_contract(kernel, aot.ATTENTION_INPUTS, aot.ATTENTION_SCALARS, aot.ATTENTION_OUTPUTS, dtype)
    assert kernel.constants["BLOCK_M"] == aot.chunk_attention_tile(dtype, head_dim).block_m


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_rolling_cache_update_ptx(capability, dtype, head_dim):
    kernel = cache_kernel(dtype, head_dim, capability)
    check_launch_contract(kernel, aot.CACHE_UPDATE_INPUTS, aot.CACHE_UPDATE_SCALARS, aot.CACHE_UPDATE_OUTPUTS, dtype)


@pytest.mark.parametrize("group", [1, 8])
def test_chunk_attention_ptx_other_gqa_ratios(group):
    kernel = chunk_kernel("fp16", 128, group, 90)
    check_launch_contract(kernel, aot.ATTENTION_INPUTS, aot.ATTENTION_SCALARS, aot.ATTENTION_OUTPUTS, "fp16")
    assert kernel.constants["GROUP"] == group


def test_scale_is_baked_in():
    a, b = chunk_kernel("fp16", 32, 4, 90), aot.compile_chunk_attention("fp16", 32, 4, 0.5, 90)
    assert a.constants["scale_log2"] != b.constants["scale_log2"] and a.ptx != b.ptx


@pytest.mark.parametrize("seq", [1, 7, 64, 65, 4096])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_chunk_grid_covers_every_query_row(seq, group):
    tile = aot.chunk_attention_tile("fp16", 128)
    grid = aot.chunk_attention_grid(3, 8, seq, group, tile)
    assert grid[1:] == (8, 3)
    assert (grid[0] - 1) * tile.block_m < seq * group <= grid[0] * tile.block_m


def test_scalars_are_contiguous_strides():
    B, Hq, Hkv, S, C, D, W = 2, 8, 2, 5, 16, 32, 16
    scalars = dict(zip(aot.ATTENTION_SCALARS, aot.chunk_attention_scalars(Hq, Hkv, S, C, D, W)))
    q, kv, cache = torch.empty(B, Hq, S, D), torch.empty(B, Hkv, S, D), torch.empty(B, Hkv, C, D)
    assert [scalars[f"stride_q{d}"] for d in "bhs"] == list(q.stride()[:3])
    assert [scalars[f"stride_o{d}"] for d in "bhs"] == list(q.stride()[:3])
    assert [scalars[f"stride_k{d}"] for d in "bhs"] == list(kv.stride()[:3])
    assert [scalars[f"stride_c{d}"] for d in "bhc"] == list(cache.stride()[:3])
    assert (scalars["seq_len"], scalars["capacity"], scalars["window"]) == (S, C, W)
    assert aot.chunk_attention_scalars(Hq, Hkv, S, C, D, NO_WINDOW)[-1] == NO_WINDOW  # the attribute as-is

    cache_scalars = dict(zip(aot.CACHE_UPDATE_SCALARS, aot.rolling_cache_update_scalars(Hkv, S, C, D)))
    assert [cache_scalars[f"stride_c{d}"] for d in "bhc"] == list(cache.stride()[:3])
    assert [cache_scalars[f"stride_n{d}"] for d in "bhs"] == list(kv.stride()[:3])


def test_rejects_unsupported_inputs():
    with pytest.raises(ValueError, match="head_dim must be one of"):
        aot.compile_chunk_attention("fp16", 96, 4, 0.1, 90)
    with pytest.raises(ValueError, match="dtype must be one of"):
        aot.compile_rolling_cache_update("int8", 128, 90)
    with pytest.raises(ValueError, match="capability must be one of"):
        aot.compile_chunk_attention("fp16", 128, 4, 0.1, 75)


def test_ptx_isa_follows_the_driver_and_never_exceeds_triton(monkeypatch):
    """The driver's CUDA version maps to the ISA it loads (Triton's table); an override is honoured, and the cap never
    asks Triton's ptxas for more than it writes."""
    assert [aot.isa_of_cuda_version(v) for v in (12000, 12040, 12080, 13000)] == [80, 84, 87, 90]
    monkeypatch.setenv("MISTRAL_EXPORT_PTX_ISA", "78")
    kernel = aot.compile_rolling_cache_update("fp16", 32, 86)
    assert kernel.ptx_isa == 78 and re.search(r"^\.version 7\.8$", kernel.ptx, flags=re.M)
    monkeypatch.setenv("MISTRAL_EXPORT_PTX_ISA", "999")
    assert aot.ptx_isa(90) == aot.triton_ptx_isa(90) < 999


def test_old_triton_is_refused_by_name():
    with pytest.raises(RuntimeError, match=r"triton >= 3.3 .*found 3.2.0"):
        aot.check_triton("3.2.0")
    aot.check_triton("3.3.1")


def test_decode_kernels_compile_for_sm90_with_pdl():
    """The JIT decode path (split partials + merge, programmatic dependent launch) compiles for Hopper.

    TensorRT does not launch these (its AOT path uses the chunk kernel), but torch on a GPU does, and no GPU
    runs the tests here: compiling catches what the interpreter cannot (e.g. gdc_* intrinsics, int64 position
    arithmetic in the prologue).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mistral_export.plugins import kernels

    def compile_ptx(fn, types: dict, constants: dict) -> str:
        signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=signature, constexprs=constants)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]

    fp32 = ("part_out_ptr", "part_max_ptr", "part_sum_ptr")
    types = {
        **{n: "*fp16" for n in ("q_ptr", "k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")},
        **{n: "*fp32" for n in fp32},
        "past_len_ptr": "*i64",
        "scale_log2": "fp32",
    }
    partial = compile_ptx(
        kernels.decode_partial_kernel,
        types,
        dict(GROUP=4, BLOCK_G=16, BLOCK_N=kernels.DECODE_BLOCK_N, HEAD_DIM=128, DOT_PRECISION="tf32", PDL=True),
    )
    merge = compile_ptx(kernels.decode_merge_kernel, types, dict(Q_HEADS=32, BLOCK_SPLITS=64, HEAD_DIM=128, PDL=True))
    for ptx in (partial, merge):
        assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx


def test_launch_arguments_follow_the_tensorrt_order():
    """What benchmarks/aot_driver_check.py hands cuLaunchKernel: the PTX entry's parameters in order, pointers as
    void*, the aot_impl scalars as int32 (checked to fit), nothing missing."""
    import ctypes

    kernel = cache_kernel("fp16", 128, 90)
    pointers = {name: 0x1000 * (i + 1) for i, name in enumerate(aot.CACHE_UPDATE_INPUTS + aot.CACHE_UPDATE_OUTPUTS)}
    scalars = aot.rolling_cache_update_scalars(8, 7, 4096, 128)
    values, types = aot.launch_arguments(kernel, pointers, scalars)
    assert len(values) == len(types) == len(aot.ptx_entry_params(kernel.ptx, kernel.name))
    expected = [pointers[n] for n in aot.CACHE_UPDATE_INPUTS] + scalars + [pointers["cache_out_ptr"]]
    assert list(values) == expected
    assert types == (ctypes.c_void_p,) * 4 + (ctypes.c_int32,) * len(scalars) + (ctypes.c_void_p,)
    with pytest.raises(ValueError, match="is not an int32"):
        aot.launch_arguments(kernel, pointers, [2**31] + scalars[1:])
    with pytest.raises(ValueError, match="takes the pointers"):
        aot.launch_arguments(kernel, {k: v for k, v in pointers.items() if k != "after_ptr"}, scalars)
    with pytest.raises(ValueError, match="int32 scalars"):
        aot.launch_arguments(kernel, pointers, scalars[:-1])
