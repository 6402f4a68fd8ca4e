"""Triton kernels for the two `mistral::` ops (DESIGN.md, "The op contract"), and their launchers.

Three kernels (plus a merge step) implement the contract:

* `decode_partial_kernel` + `decode_merge_kernel`: S = 1. One program per (split of the window, kv head,
  sequence) serves every query head of the GQA group, so K/V are read once per group; the window is split
  across programs (flash-decoding) so that batch 1 still fills the GPU, and the partial softmaxes are merged
  by a second, small kernel (both launched with programmatic dependent launch on sm_90+).
* `chunk_attention_kernel`: any S (prefill chunks; also the single-kernel form TensorRT's AOT path uses for
  decode). Tiled online softmax over [pre-update cache ∪ new keys]; each query tile visits only the keys
  inside its window band, so the cost grows as S·W rather than S².
* `rolling_cache_update_kernel`: writes the last min(S, C) new rows into slots (past_len + i) mod C, in place;
  into an output buffer of its own, it also copies every other slot of the cache (TensorRT without aliasing).

`window` is the node attribute as-is: 0 (`op_contract.NO_WINDOW`) means no window, in the kernels too.
Positions are int64 in `past_len`; each program moves its sequence's position down by a multiple of C (same
slots, same window arithmetic) so that the int32 positions inside the kernels never come near overflow.

Parameter order of the chunk and cache-update kernels is (input pointers, int32 scalars, output pointers,
constexprs): the order TensorRT's AOT plugin launch uses, so the same kernels serve torch and TensorRT.

Layouts: q [B,Hq,S,D], k/v [B,Hkv,S,D], caches [B,Hkv,C,D], past_len [B] int64, out [B,Hq,S,D]. Strides are
passed for every dim but the last; the launchers make a tensor contiguous only if its last dim is strided or
if k/v (or k_cache/v_cache) disagree on strides, since one set of strides serves each pair.

Importing this module imports triton; nothing else in the package imports it at import time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mistral_export.op_contract import NO_WINDOW

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
_NO_WINDOW = tl.constexpr(NO_WINDOW)  # jit functions read module globals only as constexpr

# Decode launch, measured on an H200 at batch 1 and 16 (benchmarks/decode_sweep.py, results in
# benchmarks/results/decode_sweep_h200.md): 32-key tiles, ~2 waves of programs over the SMs, 4 warps, 3 stages,
# and programmatic dependent launch of both kernels on sm_90+ (11.1 µs per layer at batch 1 against 13.8 for
# 64-key tiles without PDL; batch 16 not slower). Merging in the last split's program (atomic ticket) instead of
# a second kernel was no faster (12.8 vs 12.3 µs) and was removed.
DECODE_BLOCK_N = 32
DECODE_WAVES = 2.0
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 3
CACHE_UPDATE_BLOCK_ROWS = 16
# Slots one copy program of the cache update moves when the output has its own buffer (16 programs per head and
# sequence at C = 4096; they return at once when the output aliases the input).
CACHE_COPY_ROWS = 256


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, scale_log2, DOT_PRECISION: tl.constexpr):
    """One key tile of online softmax. Scores live in log2 units (scale folded with log2 e) to use exp2."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no allowed key so far keeps m = -inf; subtracting 0 instead avoids (-inf) - (-inf) = NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _ring_past(past_len_ptr, b, capacity):
    """past_len[b] as an int32 position: moved down by a multiple of C, to below 2C.

    Slots (j mod C) and every difference of positions stay the same, and keys older than past - C are never
    read, so the kernels compute in int32 whatever the sequence's real (int64) position.
    """
    past = tl.load(past_len_ptr + b)
    ring = tl.maximum(capacity, 1)
    return (past - tl.maximum(past // ring - 1, 0) * ring).to(tl.int32)


@triton.jit
def _window_start(pos, window):
    """First key position a query at `pos` attends: W keys ending at pos (the HF rule j > pos - W), or 0."""
    return tl.where(window == _NO_WINDOW, 0, pos - window + 1)


@triton.jit
def decode_partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    past_len_ptr,
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_cb,
    stride_ch,
    stride_cc,
    capacity,
    window,
    scale_log2,
    keys_per_split,
    num_splits,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    """Partial attention of one decode query per head of a GQA group over one split of its key range.

    Writes the unnormalised accumulator, running max (log2 units) and running sum per (b, q head, split).
    PDL (programmatic dependent launch, sm_90+): wait for the previous kernel before reading anything (so it
    is safe whatever kernel precedes), then let the dependent kernel (the merge) launch at once; it waits for
    this grid in its own prologue. Both are no-ops in a launch without the PDL attribute.
    """
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    kv_heads = tl.num_programs(1)

    past = _ring_past(past_len_ptr, b, capacity)
    pos = past  # the query's position
    lo = tl.maximum(tl.maximum(past - capacity, 0), _window_start(pos, window))
    start = lo + split * keys_per_split
    end = tl.minimum(start + keys_per_split, pos + 1)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    group_ok = offs_g < GROUP
    q_heads = kv_head * GROUP + offs_g
    q = tl.load(
        q_ptr + b * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :], mask=group_ok[:, None], other=0.0
    )

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)

    cache_base = b * stride_cb + kv_head * stride_ch
    ring = tl.maximum(capacity, 1)
    # Keys already in the cache: slot j mod C.
    for n0 in range(start, tl.minimum(end, past), BLOCK_N):
        j = n0 + offs_n
        ok = j < tl.minimum(end, past)
        offs = cache_base + (j % ring)[:, None] * stride_cc + offs_d[None, :]
        k = tl.load(k_cache_ptr + offs, mask=ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offs, mask=ok[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_step(q, k, v, ok[None, :], m_i, l_i, acc, scale_log2, DOT_PRECISION)
    # The new key (index j - past of this step's k/v).
    for n0 in range(tl.maximum(start, past), end, BLOCK_N):
        j = n0 + offs_n
        ok = j < end
        offs = b * stride_kb + kv_head * stride_kh + (j - past)[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + offs, mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + offs, mask=ok[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_step(q, k, v, ok[None, :], m_i, l_i, acc, scale_log2, DOT_PRECISION)

    row = (b * kv_heads + kv_head) * GROUP + offs_g  # flat (b, q head) index
    part = row * num_splits + split
    tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=group_ok[:, None])
    tl.store(part_max_ptr + part, m_i, mask=group_ok)
    tl.store(part_sum_ptr + part, l_i, mask=group_ok)


@triton.jit
def decode_merge_kernel(
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    num_splits,
    Q_HEADS: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PDL: tl.constexpr,
):
    """Merges the per-split partial softmaxes of one (b, q head) into the normalised output.

    PDL: launched early (programmatic dependent launch) and waits here for the partial kernel's grid."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    b = row // Q_HEADS
    h = row % Q_HEADS
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_s < num_splits
    m = tl.load(part_max_ptr + row * num_splits + offs_s, mask=ok, other=float("-inf"))
    sums = tl.load(part_sum_ptr + row * num_splits + offs_s, mask=ok, other=0.0)
    o = tl.load(
        part_out_ptr + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0
    )
    m_max = tl.max(m, 0)  # finite: the split holding the query's own key is never empty
    w = tl.math.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
    total = tl.sum(sums * w, 0)
    out = tl.sum(o * w[:, None], 0) / total
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def chunk_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    past_len_ptr,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_cb,
    stride_ch,
    stride_cc,
    stride_ob,
    stride_oh,
    stride_os,
    seq_len,
    capacity,
    window,
    out_ptr,
    scale_log2,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Attention of a chunk over [pre-update cache ∪ new keys], one program per BLOCK_M query rows.

    The rows of a kv head's GQA group are packed as row = i * GROUP + g (position i, head g of the group), so
    a tile covers BLOCK_M / GROUP positions of every head in the group and K/V tiles serve them all.
    `window` is the window, 0 for none; `scale_log2` is scale * log2(e), last so that the AOT path can bake it
    in as a constant.
    """
    pid_m = tl.program_id(0)
    kv_head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    past = _ring_past(past_len_ptr, b, capacity)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * seq_len
    i = rows // GROUP
    g = rows % GROUP
    pos = past + i
    first_key = _window_start(pos, window)  # per row
    q_heads = kv_head * GROUP + g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q = tl.load(
        q_ptr + b * stride_qb + q_heads[:, None] * stride_qh + i[:, None] * stride_qs + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )

    first_i = (pid_m * BLOCK_M) // GROUP
    last_i = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, seq_len - 1)
    # Key band of this tile: nothing before the earliest row's window, nothing older than the cache holds.
    lo = tl.maximum(tl.maximum(past - capacity, 0), _window_start(past + first_i, window))
    hi = past + last_i + 1  # exclusive

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Keys from the pre-update cache, slot j mod C; j < past <= pos, so only the window bounds them.
    cache_base = b * stride_cb + kv_head * stride_ch
    ring = tl.maximum(capacity, 1)
    cache_end = tl.minimum(hi, past)
    for n0 in range(lo, cache_end, BLOCK_N):
        j = n0 + offs_n
        ok = j < cache_end
        offs = cache_base + (j % ring)[:, None] * stride_cc + offs_d[None, :]
        k = tl.load(k_cache_ptr + offs, mask=ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offs, mask=ok[:, None], other=0.0)
        allowed = ok[None, :] & (j[None, :] >= first_key[:, None])
        m_i, l_i, acc = _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, scale_log2, DOT_PRECISION)

    # Keys of this chunk, index j - past of k/v: causal and window bounds per row.
    new_base = b * stride_kb + kv_head * stride_kh
    for n0 in range(tl.maximum(lo, past), hi, BLOCK_N):
        j = n0 + offs_n
        ok = j < hi
        offs = new_base + (j - past)[:, None] * stride_ks + offs_d[None, :]
        k = tl.load(k_ptr + offs, mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + offs, mask=ok[:, None], other=0.0)
        allowed = ok[None, :] & (j[None, :] <= pos[:, None]) & (j[None, :] >= first_key[:, None])
        m_i, l_i, acc = _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, scale_log2, DOT_PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l == 0 only on padding rows, never stored
    tl.store(
        out_ptr + b * stride_ob + q_heads[:, None] * stride_oh + i[:, None] * stride_os + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


@triton.jit
def rolling_cache_update_kernel(
    cache_ptr,
    new_ptr,
    past_len_ptr,
    after_ptr,
    stride_cb,
    stride_ch,
    stride_cc,
    stride_nb,
    stride_nh,
    stride_ns,
    seq_len,
    capacity,
    cache_out_ptr,
    BLOCK_R: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    COPY_ROWS: tl.constexpr,
):
    """cache_out[b, h, (past + i) mod C] = new[b, h, i] for the last min(S, C) rows i; every other slot of
    cache_out is cache's when the two are different buffers.

    The grid is (cdiv(S, BLOCK_R) + cdiv(C, COPY_ROWS), Hkv, B) (`cache_update_grid`). The first programs write
    the new rows. The others copy the untouched slots from `cache` into `cache_out`, each COPY_ROWS slots, and do
    nothing when `cache_out` is `cache` (torch in place, TensorRT with the aliased output): TensorRT may give the
    output its own buffer (no aliasing preview flag, Polygraphy's runner, trtexec), and then every slot must be
    written, the new rows by exactly one program and the rest by exactly one copy. `after_ptr` only orders the
    update after the attention that reads the old cache; it is never read.
    """
    pid = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    past = _ring_past(past_len_ptr, b, capacity)
    ring = tl.maximum(capacity, 1)
    kept = tl.minimum(seq_len, capacity)
    first = seq_len - kept  # earlier rows would be overwritten in the same chunk
    offs_d = tl.arange(0, HEAD_DIM)
    out_base = cache_out_ptr + b * stride_cb + head * stride_ch
    update_programs = tl.cdiv(seq_len, BLOCK_R)
    if pid < update_programs:
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = (rows >= first) & (rows < seq_len)
        x = tl.load(
            new_ptr + b * stride_nb + head * stride_nh + rows[:, None] * stride_ns + offs_d[None, :],
            mask=ok[:, None],
            other=0.0,
        )
        slots = (past + rows) % ring
        tl.store(
            out_base + slots[:, None] * stride_cc + offs_d[None, :],
            x.to(cache_out_ptr.dtype.element_ty),
            mask=ok[:, None],
        )
    elif cache_ptr.to(tl.int64) != cache_out_ptr.to(tl.int64):  # pointers compare as integers only
        in_base = cache_ptr + b * stride_cb + head * stride_ch
        start = (pid - update_programs) * COPY_ROWS
        for r0 in range(0, COPY_ROWS, BLOCK_R):
            slots = start + r0 + tl.arange(0, BLOCK_R)
            # A slot the update writes holds offset (slot - past) mod C < min(S, C) from the sequence's position.
            written = ((slots - past % ring + ring) % ring) < kept
            ok = (slots < capacity) & ~written
            offs = slots[:, None] * stride_cc + offs_d[None, :]
            tl.store(out_base + offs, tl.load(in_base + offs, mask=ok[:, None], other=0.0), mask=ok[:, None])


def cache_update_grid(batch, kv_heads: int, seq, capacity: int) -> tuple:
    """The grid of `rolling_cache_update_kernel` (torch and TensorRT's AOT launch alike): programs writing the new
    rows, then programs copying the rest of the cache when the output is not the input. `seq` and `batch` may be
    TensorRT shape expressions (only + and // on them)."""
    return (
        (seq + (CACHE_UPDATE_BLOCK_ROWS - 1)) // CACHE_UPDATE_BLOCK_ROWS + -(-capacity // CACHE_COPY_ROWS),
        kv_heads,
        batch,
    )


# ----------------------------------------------------------------------------------------------------------
# Configurations (shared with aot.py, so that the JIT and AOT paths launch the same shapes)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 I/O must not silently drop to tf32 in tl.dot (the contract's fp32 path is exact to ~1e-6)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def chunk_config(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None) -> ChunkConfig:
    """Tile shapes for the chunk kernel. `capability` None means the CPU interpreter (small, fast tiles)."""
    if capability is None:
        return ChunkConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
    wide = dtype == torch.float32 or head_dim > 64
    if capability >= (9, 0) or capability == (8, 0):  # 164-228 KB of shared memory per SM
        if wide:
            return ChunkConfig(block_m=128, block_n=64, num_warps=8, num_stages=2 if dtype == torch.float32 else 3)
        return ChunkConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    # sm_86 / sm_89: about 100 KB of shared memory per SM.
    return ChunkConfig(block_m=64, block_n=32 if wide else 64, num_warps=4, num_stages=2)


def decode_block_g(group: int) -> int:
    """Rows of the decode tile: the GQA group, padded to tl.dot's minimum of 16."""
    return max(16, triton.next_power_of_2(group))


def decode_splits(
    max_keys: int, work_items: int, num_sms: int, block_n: int, waves: float = DECODE_WAVES
) -> tuple[int, int]:
    """(num_splits, keys_per_split): enough programs to cover ~`waves` waves of the SMs, each a whole number of
    tiles. (`waves` other than the default: benchmarks/decode_sweep.py.)"""
    tiles = triton.cdiv(max_keys, block_n)
    wanted = max(1, math.ceil(waves * num_sms / max(work_items, 1)))
    splits = min(tiles, wanted)
    keys_per_split = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(max_keys, keys_per_split), keys_per_split


def decode_max_keys(window: int, capacity: int) -> int:
    """Keys a decode query attends at most: its window, or the C cached keys and itself."""
    return capacity + 1 if window == NO_WINDOW else min(window, capacity + 1)


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must be {layout}; got shape {tuple(t.shape)}")


def _check_io_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32; got {t.dtype}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have the dtype of q ({dtype}); got {t.dtype}")


def _check_head_dim(name: str, head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name} head_dim must be one of {SUPPORTED_HEAD_DIMS}; got {head_dim}")


def _check_past_len(past_len: torch.Tensor, batch: int) -> None:
    if past_len.dtype != torch.int64 or past_len.shape != (batch,):
        raise ValueError(f"past_len must be int64 [B={batch}]; got {past_len.dtype} {tuple(past_len.shape)}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _last_dim_contiguous(a), _last_dim_contiguous(b)
    if a.stride() != b.stride():
        a, b = a.contiguous(), b.contiguous()
    return a, b


@functools.cache
def _cuda_device_info(index: int) -> tuple[tuple[int, int], int]:
    """(capability, SM count); cached because launchers run once per layer per token."""
    return torch.cuda.get_device_capability(index), torch.cuda.get_device_properties(index).multi_processor_count


def _device_info(t: torch.Tensor) -> tuple[tuple[int, int], int]:
    return _cuda_device_info(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _capability(t: torch.Tensor) -> tuple[int, int] | None:
    return _device_info(t)[0] if t.is_cuda else None


def _num_sms(t: torch.Tensor) -> int:
    return _device_info(t)[1] if t.is_cuda else 4


def _check_attention_inputs(q, k, v, k_cache, v_cache, past_len, window: int) -> None:
    _check_rank("q", q, 4, "[B,Hq,S,D]")
    _check_rank("k", k, 4, "[B,Hkv,S,D]")
    _check_rank("v", v, 4, "[B,Hkv,S,D]")
    _check_rank("k_cache", k_cache, 4, "[B,Hkv,C,D]")
    _check_rank("v_cache", v_cache, 4, "[B,Hkv,C,D]")
    batch, q_heads, seq, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    _check_head_dim("q", head_dim)
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_io_dtype(name, t, q.dtype)
    if k.shape != (batch, kv_heads, seq, head_dim) or v.shape != k.shape:
        raise ValueError(
            f"k and v must be [B,Hkv,S,D] = {(batch, kv_heads, seq, head_dim)}; "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if v_cache.shape != k_cache.shape or k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache and v_cache must be [B,Hkv,C,D] with B={batch}, D={head_dim}; "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if q_heads % kv_heads:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    _check_past_len(past_len, batch)
    if window < 0:
        raise ValueError(f"window must be >= 0 ({NO_WINDOW} = no window); got {window}")


def _check_cache_update_inputs(cache, new, past_len) -> None:
    _check_rank("cache", cache, 4, "[B,Hkv,C,D]")
    _check_rank("new", new, 4, "[B,Hkv,S,D]")
    batch, heads, capacity, head_dim = cache.shape
    _check_head_dim("cache", head_dim)
    if cache.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"cache must be float16, bfloat16 or float32; got {cache.dtype}")
    if new.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"new must be float16, bfloat16 or float32; got {new.dtype}")
    if new.shape[0] != batch or new.shape[1] != heads or new.shape[3] != head_dim:
        raise ValueError(f"new must be [B={batch},Hkv={heads},S,D={head_dim}]; got {tuple(new.shape)}")
    if cache.stride(-1) != 1:
        raise ValueError("cache must have a contiguous last dim (it is updated in place)")
    _check_past_len(past_len, batch)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

# Programmatic dependent launch: Triton >= 3.4 on sm_90+ (`launch_pdl=True` and tl.extra.cuda.gdc_*).
_PDL_AVAILABLE = hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")


def uses_pdl(t: torch.Tensor) -> bool:
    """Whether decode launches on `t`'s device use programmatic dependent launch (sm_90+, Triton >= 3.4)."""
    return t.is_cuda and _PDL_AVAILABLE and _capability(t) >= (9, 0)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    past_len: torch.Tensor,
    window: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    chunk: ChunkConfig | None = None,
    keys_per_split: int | None = None,
    decode_block_n: int = DECODE_BLOCK_N,
) -> torch.Tensor:
    """The SlidingWindowAttention contract on Triton: S = 1 takes the split decode path, else the chunk kernel.

    `out` may be passed (it is fully overwritten). `chunk`, `keys_per_split` and `decode_block_n` are test hooks
    that override the tile and split choices (tests cross tile and split boundaries at small shapes with them).
    """
    _check_attention_inputs(q, k, v, k_cache, v_cache, past_len, window)
    q = _last_dim_contiguous(q)
    k, v = _same_strides(k, v)
    k_cache, v_cache = _same_strides(k_cache, v_cache)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    batch, _, seq, _ = q.shape
    if batch == 0 or seq == 0:
        return out
    args = (q, k, v, k_cache, v_cache, past_len, window, float(scale) * LOG2E, out)
    if seq == 1:
        _decode(*args, keys_per_split, decode_block_n)
    else:
        _chunk(*args, chunk or chunk_config(q.shape[3], q.dtype, _capability(q)))
    return out


def _decode(q, k, v, k_cache, v_cache, past_len, window, scale_log2, out, keys_per_split, block_n) -> None:
    """S = 1. k/v hold a single row, so their S stride never matters (the kernel reads row 0 only)."""
    batch, q_heads, _, head_dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    max_keys = decode_max_keys(window, capacity)
    if keys_per_split is None:
        splits, keys_per_split = decode_splits(max_keys, batch * kv_heads, _num_sms(q), block_n)
    else:
        splits = triton.cdiv(max_keys, keys_per_split)
    part_out = torch.empty((batch * q_heads * splits, head_dim), device=q.device, dtype=torch.float32)
    part_max = torch.empty((batch * q_heads * splits,), device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    pdl = uses_pdl(q)
    launch = {"launch_pdl": True} if pdl else {}  # only where Triton knows the option (>= 3.4)
    decode_partial_kernel[(splits, kv_heads, batch)](
        q,
        k,
        v,
        k_cache,
        v_cache,
        past_len,
        part_out,
        part_max,
        part_sum,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        capacity,
        window,
        scale_log2,
        keys_per_split,
        splits,
        GROUP=group,
        BLOCK_G=decode_block_g(group),
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        DOT_PRECISION=dot_precision(q.dtype),
        PDL=pdl,
        num_warps=DECODE_NUM_WARPS,
        num_stages=DECODE_NUM_STAGES if q.is_cuda else 1,
        **launch,
    )
    decode_merge_kernel[(batch * q_heads,)](
        part_out,
        part_max,
        part_sum,
        out,
        out.stride(0),
        out.stride(1),
        splits,
        Q_HEADS=q_heads,
        BLOCK_SPLITS=triton.next_power_of_2(splits),
        HEAD_DIM=head_dim,
        PDL=pdl,
        num_warps=4 if head_dim >= 64 else 1,
        **launch,
    )


def _chunk(q, k, v, k_cache, v_cache, past_len, window, scale_log2, out, cfg: ChunkConfig) -> None:
    batch, q_heads, seq, head_dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    chunk_attention_kernel[(triton.cdiv(group * seq, cfg.block_m), kv_heads, batch)](
        q,
        k,
        v,
        k_cache,
        v_cache,
        past_len,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        seq,
        capacity,
        window,
        out,
        scale_log2,
        GROUP=group,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        HEAD_DIM=head_dim,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def rolling_cache_update(
    cache: torch.Tensor, new: torch.Tensor, past_len: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The RollingCacheUpdate contract on Triton into `out` (default: `cache` itself, in place; zero-copy). An `out`
    of its own gets the whole updated cache: the old slots copied from `cache`, then the new rows."""
    _check_cache_update_inputs(cache, new, past_len)
    if out is None:
        out = cache
    elif out.shape != cache.shape or out.dtype != cache.dtype or out.stride() != cache.stride():
        raise ValueError(
            f"out must be {tuple(cache.shape)} {cache.dtype} with the strides of cache {cache.stride()}; "
            f"got {tuple(out.shape)} {out.dtype} {out.stride()}"
        )
    new = _last_dim_contiguous(new)
    batch, heads, capacity, head_dim = cache.shape
    seq = new.shape[2]
    if batch == 0 or capacity == 0:
        return out
    if seq == 0:
        if out is not cache:
            out.copy_(cache)
        return out
    rolling_cache_update_kernel[cache_update_grid(batch, heads, seq, capacity)](
        cache,
        new,
        past_len,
        cache,
        cache.stride(0),
        cache.stride(1),
        cache.stride(2),
        new.stride(0),
        new.stride(1),
        new.stride(2),
        seq,
        capacity,
        out,
        BLOCK_R=CACHE_UPDATE_BLOCK_ROWS,
        HEAD_DIM=head_dim,
        COPY_ROWS=CACHE_COPY_ROWS,
        num_warps=4 if head_dim >= 64 else 1,
    )
    return out


def rolling_cache_update_(cache: torch.Tensor, new: torch.Tensor, past_len: torch.Tensor) -> None:
    """The RollingCacheUpdate contract on Triton, in place on `cache` (its last dim must be contiguous)."""
    rolling_cache_update(cache, new, past_len)


__all__ = [
    "CACHE_COPY_ROWS",
    "CACHE_UPDATE_BLOCK_ROWS",
    "ChunkConfig",
    "DECODE_BLOCK_N",
    "LOG2E",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "chunk_attention_kernel",
    "chunk_config",
    "decode_merge_kernel",
    "decode_partial_kernel",
    "dot_precision",
    "cache_update_grid",
    "rolling_cache_update",
    "rolling_cache_update_",
    "rolling_cache_update_kernel",
    "sliding_window_attention",
]
