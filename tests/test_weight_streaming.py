"""Weights streamed into external data: slots holding several checkpoint tensors side by side."""

import numpy as np
import pytest
import torch

from mistral_export.errors import MistralExportError
from mistral_export.export import weight_streaming


def read_slot(path, slot):
    return np.fromfile(path, dtype=np.float32, count=slot.length // 4, offset=slot.offset).reshape(slot.shape)


@pytest.mark.parametrize("block_bytes", [weight_streaming.BLOCK_BYTES, 64])  # one block, and blocks of a single row
def test_side_by_side_slot_holds_the_transposed_sources(tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(weight_streaming, "BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "wq": torch.randn(8, 6, generator=g),
        "wk": torch.randn(4, 6, generator=g),
        "wv": torch.randn(4, 6, generator=g),
        "norm": torch.randn(6, generator=g),
    }
    slots = weight_streaming.plan_layout(
        [
            ("norm", ("norm",), (6,), False, (6,)),
            ("qkv.T", ("wq", "wk", "wv"), (8, 4, 4), True, (6, 16)),
        ],
        torch.float32,
    )
    path = tmp_path / "w.data"
    # Streamed in an order unlike the slot's column order.
    weight_streaming.write_weights(path, slots, [(n, tensors[n]) for n in ("wv", "norm", "wq", "wk")])
    norm, qkv = slots
    assert qkv.offset % weight_streaming.ALIGNMENT == 0 and qkv.offset >= norm.length
    np.testing.assert_array_equal(read_slot(path, norm), tensors["norm"].numpy())
    expected = torch.cat([tensors["wq"].t(), tensors["wk"].t(), tensors["wv"].t()], dim=1)
    np.testing.assert_array_equal(read_slot(path, qkv), expected.numpy())


def test_wrong_part_shape_and_missing_part_are_named(tmp_path):
    slots = weight_streaming.plan_layout([("qkv.T", ("wq", "wk"), (8, 4), True, (6, 12))], torch.float32)
    with pytest.raises(MistralExportError, match=r"'wk' has shape \[5, 4\].*expects \[6, 4\]"):
        weight_streaming.write_weights(tmp_path / "a", slots, [("wq", torch.zeros(8, 6)), ("wk", torch.zeros(4, 5))])
    with pytest.raises(MistralExportError, match=r"missing for: wk \(qkv.T\)"):
        weight_streaming.write_weights(tmp_path / "b", slots, [("wq", torch.zeros(8, 6))])
    assert not (tmp_path / "b").exists()
