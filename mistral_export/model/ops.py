"""The two `mistral::` ops of the op contract (DESIGN.md), as plain-torch references.

Every other implementation (ONNX function bodies, Triton kernels, TensorRT plugins) is tested
against the functions in this file. They are registered with `torch.library` so that other
backends (CUDA kernels) can override them per device while the model code stays the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mistral_export.op_contract import NO_WINDOW, TORCH_ATTENTION, TORCH_CACHE_UPDATE, TORCH_CACHE_UPDATE_INPLACE


def cache_positions(past_len: Tensor, capacity: int) -> Tensor:
    """Absolute position held by each cache slot before a chunk starting at `past_len`: [B, C].

    Slot s holds the latest position j < past_len with j mod C == s; negative means empty.
    """
    slots = torch.arange(capacity, device=past_len.device, dtype=torch.int64)
    last = past_len.to(torch.int64).unsqueeze(1) - 1
    return last - torch.remainder(last - slots, capacity)


def sliding_window_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    past_len: Tensor,
    window: int,
    scale: float,
) -> Tensor:
    """Attention of a chunk over [pre-update cache ∪ new keys] with a sliding window and GQA.

    Differentiable, so the fixture's training uses it directly (with an empty cache).
    """
    batch, q_heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    capacity = k_cache.shape[2]
    group = q_heads // kv_heads

    new_pos = past_len.to(torch.int64).unsqueeze(1) + torch.arange(seq, device=q.device)  # [B,S]
    if capacity and past_len.numel() and not torch.compiler.is_compiling():
        # Until the ring first wraps, slot s holds position s, so slots past the longest prefix are empty for every
        # row: attending over them only adds exact zeros (a prefill from an empty cache of 4096 slots otherwise
        # spends most of its time on them).
        filled = int(past_len.max())
        if filled < capacity:
            capacity = filled
            k_cache, v_cache = k_cache[:, :, :filled], v_cache[:, :, :filled]
    if capacity:
        old_pos = cache_positions(past_len, capacity)  # [B,C]
        key_pos = torch.cat([old_pos, new_pos], dim=1)
        keys = torch.cat([k_cache, k], dim=2)
        values = torch.cat([v_cache, v], dim=2)
    else:
        key_pos, keys, values = new_pos, k, v

    kp = key_pos.unsqueeze(1)  # [B,1,K]
    qp = new_pos.unsqueeze(2)  # [B,S,1]
    allowed = (kp >= 0) & (kp <= qp)
    if window != NO_WINDOW:
        allowed &= kp > qp - window

    # Group query heads by their kv head so K/V are used without being repeated per query head.
    qg = q.float().reshape(batch, kv_heads, group * seq, head_dim)
    scores = torch.matmul(qg, keys.float().transpose(-1, -2)) * scale  # [B,Hkv,G*S,K]
    scores = scores.view(batch, kv_heads, group, seq, -1)
    scores = scores.masked_fill(~allowed.view(batch, 1, 1, seq, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, group * seq, -1)
    out = torch.matmul(probs, values.float())
    return out.view(batch, q_heads, seq, head_dim).to(q.dtype)


def rolling_cache_update_slots(past_len: Tensor, seq: int, capacity: int) -> tuple[Tensor, int]:
    """Slots written by a chunk of `seq` rows: ([B, n] slot indices, first row kept), n = min(S, C)."""
    kept = min(seq, capacity)
    first = seq - kept
    rows = torch.arange(first, seq, device=past_len.device, dtype=torch.int64)
    return torch.remainder(past_len.to(torch.int64).unsqueeze(1) + rows, capacity), first


def rolling_cache_update_in_place(cache: Tensor, new: Tensor, past_len: Tensor) -> None:
    batch, heads, capacity, head_dim = cache.shape
    slots, first = rolling_cache_update_slots(past_len, new.shape[2], capacity)
    index = slots.view(batch, 1, -1, 1).expand(batch, heads, slots.shape[1], head_dim)
    cache.scatter_(2, index, new[:, :, first:].to(cache.dtype))


def rolling_cache_update_reference(cache: Tensor, new: Tensor, past_len: Tensor) -> Tensor:
    """Functional form of the contract: the cache after writing `new` at slots (past_len+i) mod C."""
    out = cache.clone()
    rolling_cache_update_in_place(out, new, past_len)
    return out


@torch.library.custom_op(TORCH_ATTENTION, mutates_args=())
def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    past_len: Tensor,
    window: int,
    scale: float,
) -> Tensor:
    return sliding_window_attention_reference(q, k, v, k_cache, v_cache, past_len, window, scale)


@sliding_window_attention.register_fake
def _(q, k, v, k_cache, v_cache, past_len, window, scale):
    return torch.empty_like(q)


@torch.library.custom_op(TORCH_CACHE_UPDATE_INPLACE, mutates_args=("cache",))
def rolling_cache_update_(cache: Tensor, new: Tensor, past_len: Tensor) -> None:
    """In-place update used by the eager model: no copy of the cache per step."""
    rolling_cache_update_in_place(cache, new, past_len)


@rolling_cache_update_.register_fake
def _(cache, new, past_len):
    return None


@torch.library.custom_op(TORCH_CACHE_UPDATE, mutates_args=())
def rolling_cache_update(cache: Tensor, new: Tensor, past_len: Tensor, after: Tensor) -> Tensor:
    """Functional update for traced graphs (a graph holds no in-place state): the cache after writing `new`.

    `after` (the same layer's attention output) is an ordering input only: the graph must not run the
    update before the attention that reads the old cache. It is never read.
    """
    return rolling_cache_update_reference(cache, new, past_len)


@rolling_cache_update.register_fake
def _(cache, new, past_len, after):
    return torch.empty_like(cache)
