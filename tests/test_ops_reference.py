"""Rules of the op contract that the torch reference (model/ops.py) must keep and that parity cannot see.

Parity with Hugging Face (test_model_parity.py) checks the reference's attention in fp32 and its cache on CPU,
where a scatter writes in order: a chunk longer than C that also wrote its overwritten rows would still end with
the right cache. So the cache update's scatter is inspected (every kept slot written once, by one of the last
min(S, C) rows), and the attention's fp32 accumulation is checked for fp16/bf16 I/O.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mistral_export.model.ops import (
    rolling_cache_update_in_place,
    rolling_cache_update_reference,
    sliding_window_attention_reference,
)


class ScatterRecorder(TorchDispatchMode):
    """Records (dim, index) of every aten scatter the code under it runs."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.scatter_, torch.ops.aten.scatter):
            self.calls.append((args[1], args[2].clone()))
        return func(*args, **(kwargs or {}))


CAPACITY = 8
CHUNKS = {"chunk>C": (21, [0, 13]), "chunk=C": (8, [3, 0]), "chunk<C-wraps": (5, [6, 100]), "decode": (1, [7, 8])}


@pytest.mark.parametrize("chunk", CHUNKS)
def test_cache_update_writes_each_kept_slot_once(chunk):
    seq, past = CHUNKS[chunk]
    capacity = CAPACITY
    cache, new = torch.randn(2, 3, capacity + seq, 4, generator=torch.Generator().manual_seed(seq)).split(
        [capacity, seq], dim=2
    )
    cache = cache.contiguous()
    past_len = torch.tensor(past)
    expected = rolling_cache_update_reference(cache, new, past_len)
    with ScatterRecorder() as recorder:
        rolling_cache_update_in_place(cache, new, past_len)
    assert len(recorder.calls) == 1, "the update is one scatter"
    dim, index = recorder.calls[0]
    assert dim == 2 and index.shape[2] == min(seq, capacity), "writes exactly the last min(S, C) rows"
    # Per (b, h, d): distinct slots, i.e. no slot written twice (the write order would decide the result).
    assert (index.sort(dim=2).values.diff(dim=2) > 0).all()
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seq,past", [(1, [40, 3]), (6, [9, 0])], ids=["decode", "chunk"])
def test_attention_accumulates_in_fp32(dtype, seq, past):
    """With fp16/bf16 I/O the result is the fp32 computation on the same (rounded) inputs, rounded once."""
    g = torch.Generator().manual_seed(seq)
    q = (3 * torch.randn(2, 8, seq, 64, generator=g)).to(dtype)
    k, v = ((3 * torch.randn(2, 2, seq, 64, generator=g)).to(dtype) for _ in range(2))
    k_cache, v_cache = ((3 * torch.randn(2, 2, 16, 64, generator=g)).to(dtype) for _ in range(2))
    past_len = torch.tensor(past)
    args = (past_len, 16, 64**-0.5)
    out = sliding_window_attention_reference(q, k, v, k_cache, v_cache, *args)
    wide = sliding_window_attention_reference(*(t.float() for t in (q, k, v, k_cache, v_cache)), *args)
    assert out.dtype == dtype
    assert torch.equal(out, wide.to(dtype))
