"""The runner interface every backend implements (eager torch, ONNX Runtime, TensorRT).

A runner owns one rolling cache for a batch of sequences. `step` runs a chunk of tokens at
the given per-sequence positions and updates the cache; prefill and decode are both steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor

from mistral_export.model.config import ModelConfig
from mistral_export.model.transformer import Transformer, allocate_cache


class Runner(Protocol):
    config: ModelConfig

    def reset(self, batch_size: int) -> None:
        """Start new sequences: an empty cache for `batch_size` sequences."""

    def step(self, input_ids: Tensor, past_len: Tensor) -> Tensor:
        """Logits [B,S,V] (fp32, CPU) for tokens [B,S] at positions past_len[b] + i; updates the cache."""


class EagerRunner:
    def __init__(self, model: Transformer, device: str = "cpu"):
        self.model = model
        self.config = model.config
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.cache = None

    def reset(self, batch_size: int) -> None:
        self.cache = allocate_cache(self.config, batch_size, self.dtype, self.device)

    @torch.inference_mode()
    def step(self, input_ids: Tensor, past_len: Tensor) -> Tensor:
        logits, _ = self.model(input_ids.to(self.device), past_len.to(self.device), self.cache)
        return logits.float().cpu()


def prefill(runner: Runner, prompt_ids: Tensor, chunk_size: int | None = None) -> Tensor:
    """Run a [B,T] prompt from position 0 in chunks (None: one chunk); returns logits [B,T,V]."""
    batch, length = prompt_ids.shape
    chunk = chunk_size or length
    outputs = []
    for start in range(0, length, chunk):
        past_len = torch.full((batch,), start, dtype=torch.int64)
        outputs.append(runner.step(prompt_ids[:, start:start + chunk], past_len))
    return torch.cat(outputs, dim=1)


def greedy_tokens(runner: Runner, prompt_ids: list[int], max_new_tokens: int,
                  chunk_size: int | None = None, stop_id: int | None = None) -> Iterator[int]:
    """Greedy continuation of one prompt, yielded token by token."""
    runner.reset(1)
    logits = prefill(runner, torch.tensor([prompt_ids], dtype=torch.int64), chunk_size)
    position = len(prompt_ids)
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        yield token
        if token == stop_id:
            return
        logits = runner.step(torch.tensor([[token]]), torch.tensor([position]))
        position += 1

