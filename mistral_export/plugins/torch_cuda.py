"""CUDA implementations of the torch.library ops `mistral::sliding_window_attention` and
`mistral::rolling_cache_update_`, on the Triton kernels. Importing this module registers them; CPU tensors keep
using the reference implementations in `mistral_export.model.ops`.

Imported on demand (e.g. by the CLI's `--attention triton`), since it imports triton.
"""

from __future__ import annotations

import torch

from mistral_export.model import ops  # noqa: F401  (defines the ops this module registers kernels for)

from . import kernels


@torch.library.register_kernel("mistral::sliding_window_attention", "cuda")
def _sliding_window_attention_cuda(q, k, v, k_cache, v_cache, past_len, window, scale):
    return kernels.sliding_window_attention(q, k, v, k_cache, v_cache, past_len, int(window), float(scale))


@torch.library.register_kernel("mistral::rolling_cache_update_", "cuda")
def _rolling_cache_update_cuda(cache, new, past_len):
    kernels.rolling_cache_update_(cache, new, past_len)


REGISTERED_OPS = ("mistral::sliding_window_attention", "mistral::rolling_cache_update_")
