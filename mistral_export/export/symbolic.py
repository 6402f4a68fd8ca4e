"""Export-time emission of the two `mistral::` ops (DESIGN.md, op contract).

`Attention.forward` calls `attention_and_cache_update` while `torch.onnx.is_in_onnx_export()`;
`torch.onnx.ops.symbolic` records an opaque node that the dynamo exporter writes as-is into the
ONNX graph. Its meaning comes from the model-local function bodies in `functions.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

DOMAIN = "mistral"
VERSION = 1
PLUGIN_NAMESPACE = "mistral"
SWA_OP = "SlidingWindowAttention"
UPDATE_OP = "RollingCacheUpdate"


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                             past_len: Tensor, window: int, scale: float) -> Tensor:
    return torch.onnx.ops.symbolic(
        f"{DOMAIN}::{SWA_OP}",
        (q, k, v, k_cache, v_cache, past_len),
        attrs={"window": int(window), "scale": float(scale), "plugin_namespace": PLUGIN_NAMESPACE},
        dtype=q.dtype,
        shape=q.shape,
        version=VERSION,
    )


def rolling_cache_update(cache: Tensor, new: Tensor, past_len: Tensor, after: Tensor) -> Tensor:
    return torch.onnx.ops.symbolic(
        f"{DOMAIN}::{UPDATE_OP}",
        (cache, new, past_len, after),
        attrs={"plugin_namespace": PLUGIN_NAMESPACE},
        dtype=cache.dtype,
        shape=cache.shape,
        version=VERSION,
    )


def attention_and_cache_update(q: Tensor, k: Tensor, v: Tensor, cache: tuple[Tensor, Tensor], past_len: Tensor,
                               window: int, scale: float) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Attention over the pre-update cache, then both cache updates ordered after it."""
    k_cache, v_cache = cache
    out = sliding_window_attention(q, k, v, k_cache, v_cache, past_len, window, scale)
    present_k = rolling_cache_update(k_cache, k, past_len, out)
    present_v = rolling_cache_update(v_cache, v, past_len, out)
    return out, (present_k, present_v)
