"""The runner interface every backend implements (eager torch, ONNX Runtime, TensorRT).

A runner owns one rolling cache for a batch of sequences. `step` runs a chunk of tokens at
the given per-sequence positions and updates the cache; prefill and decode are both steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import Tensor

from mistral_export.errors import MistralExportError
from mistral_export.model.config import ModelConfig
from mistral_export.model.transformer import Transformer, allocate_cache
from mistral_export.op_contract import check_positions


class Runner(ABC):
    """A backend's view of the model: a batch of sequences sharing one rolling cache.

    `step` checks every call against the op contract's limits (op_contract.check_positions: a cache
    without a window must not overflow, positions stay below op_contract.MAX_POSITION) before the backend runs it,
    since no graph, kernel or engine can refuse by itself.
    """

    config: ModelConfig
    batch_size: int = 0

    @property
    def cache_capacity(self) -> int:
        return self.config.cache_capacity

    @property
    def cache_wraps(self) -> bool:
        return self.config.sliding_window is not None

    @abstractmethod
    def reset(self, batch_size: int) -> None:
        """Start new sequences: an empty cache for `batch_size` sequences."""

    def step(self, input_ids: Tensor, past_len: Tensor) -> Tensor:
        """Logits [B,S,V] (fp32, CPU) for tokens [B,S] at positions past_len[b] + i; updates the cache."""
        self._check_step(input_ids, past_len, self.batch_size, "the batch given to reset")
        return self._step(input_ids, past_len)

    def _check_step(self, input_ids: Tensor, past_len: Tensor, batch: int, which: str) -> None:
        """Tokens [batch,S] at past_len [batch] within the op contract's limits (`which` names the batch)."""
        if not self.batch_size:
            raise MistralExportError(f"{type(self).__name__}.step before reset(batch_size)")
        if input_ids.ndim != 2 or input_ids.shape[0] != batch or tuple(past_len.shape) != (batch,):
            raise MistralExportError(
                f"step expects input_ids [{batch}, S] and past_len [{batch}] "
                f"({which}), got {list(input_ids.shape)} and {list(past_len.shape)}"
            )
        check_positions(past_len.tolist(), input_ids.shape[1], self.cache_capacity, self.cache_wraps)

    @abstractmethod
    def _step(self, input_ids: Tensor, past_len: Tensor) -> Tensor:
        """The backend's step, on inputs `step` has checked."""

    def _check_slots(self, first: int, count: int) -> None:
        """Slots first..first+count-1 lie in the batch `reset` allocated (runners with the slot API of in-flight
        batching: step_slots, prefill_slot, move_slot)."""
        if not self.batch_size:
            raise MistralExportError(f"{type(self).__name__}: slot step before reset(batch_size)")
        if first < 0 or count < 1 or first + count > self.batch_size:
            raise MistralExportError(
                f"slots {first}..{first + count - 1} are outside the batch of {self.batch_size} that reset allocated"
            )


class EagerRunner(Runner):
    def __init__(self, model: Transformer, device: str = "cpu"):
        self.model = model
        self.config = model.config
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.cache = None

    def reset(self, batch_size: int) -> None:
        self.cache = allocate_cache(self.config, batch_size, self.dtype, self.device)
        self.batch_size = batch_size

    @torch.inference_mode()
    def _step(self, input_ids: Tensor, past_len: Tensor) -> Tensor:
        logits, _ = self.model(input_ids.to(self.device), past_len.to(self.device), self.cache)
        return logits.float().cpu()


def prefill(runner: Runner, prompt_ids: Tensor, chunk_size: int | None = None) -> Tensor:
    """Run a [B,T] prompt from position 0 in chunks (None: one chunk); returns logits [B,T,V]."""
    batch, length = prompt_ids.shape
    chunk = chunk_size or length
    outputs = []
    for start in range(0, length, chunk):
        past_len = torch.full((batch,), start, dtype=torch.int64)
        outputs.append(runner.step(prompt_ids[:, start : start + chunk], past_len))
    return torch.cat(outputs, dim=1)


def check_generation_fits(runner: Runner, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse, before any step, a generation that would pass a linear (window-less) cache: greedy_tokens runs the
    prompt and every new token (the server's limit is the same: prompt + max_tokens <= capacity)."""
    end = prompt_tokens + max_new_tokens
    if not runner.cache_wraps and end > runner.cache_capacity:
        fits = runner.cache_capacity - prompt_tokens
        raise MistralExportError(
            f"the prompt ({prompt_tokens} tokens) + --max-new-tokens {max_new_tokens} needs {end} cache slots, more "
            f"than the cache capacity {runner.cache_capacity} of this model without sliding window; "
            + (f"ask for at most {fits} new tokens" if fits > 0 else "shorten the prompt")
        )


def greedy_tokens(
    runner: Runner,
    prompt_ids: list[int],
    max_new_tokens: int,
    chunk_size: int | None = None,
    stop_id: int | None = None,
) -> Iterator[int]:
    """Greedy continuation of one prompt, yielded token by token (check_generation_fits first, to refuse one that
    cannot fit before any token, rather than at the step that passes the cache)."""
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
