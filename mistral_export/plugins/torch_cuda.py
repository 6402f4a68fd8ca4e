"""CUDA implementations of the torch.library ops `mistral::sliding_window_attention` and
`mistral::rolling_cache_update_`, on the Triton kernels. Importing this module registers them; CPU tensors keep
using the reference implementations in `mistral_export.model.ops`.

Imported on demand (e.g. by the CLI's `--attention triton`), since it imports triton.
"""

from __future__ import annotations

import torch

from mistral_export.model import ops  # noqa: F401  (defines the ops this module registers kernels for)
from mistral_export.op_contract import TORCH_ATTENTION, TORCH_CACHE_UPDATE_INPLACE

from . import kernels


@torch.library.register_kernel(TORCH_ATTENTION, "cuda")
def _sliding_window_attention_cuda(q, k, v, k_cache, v_cache, past_len, window, scale):
    return kernels.sliding_window_attention(q, k, v, k_cache, v_cache, past_len, int(window), float(scale))


@torch.library.register_kernel(TORCH_CACHE_UPDATE_INPLACE, "cuda")
def _rolling_cache_update_cuda(cache, new, past_len):
    kernels.rolling_cache_update_(cache, new, past_len)
