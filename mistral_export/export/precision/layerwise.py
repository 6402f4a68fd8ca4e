"""Calibration one decoder layer at a time (sequential onloading, as llm-compressor and AutoAWQ do).

The whole model never sits in memory: the calibration set's hidden states are kept (N samples x T tokens x
hidden, fp32: 128 MiB for Mistral 7B at 32 x 256), one decoder layer is loaded in fp32 on the calibration
device, every calibration step runs through it, the layer's consumer collects what it needs (hooks on the
inputs of its Linears), changes the layer if it wants (SmoothQuant folds its factors) and writes it; then the
layer's outputs become the next layer's inputs and the layer is freed.

Each sample runs as a sequence is served (`calibration.step_plan`): prefill chunks of at most the cache
capacity, then decode steps of one token, each step reading the layer's rolling cache that the earlier steps
wrote. A layer's output at a step depends only on its input at that step and its own cache, so going layer by
layer computes the same activations as running the whole model step by step; decode steps of a group of
samples run as one batch (same positions), equal to one-by-one within fp32 rounding.

Memory besides the hidden states: one layer's fp32 weights, the layer's cache for one group of samples
(GROUP_CACHE_BYTES), and one sample's prefill attention scores.

Each precision passes its own `LayerHook` factories: SmoothQuant and fp8 read channel maxima (`ChannelMaxima`),
AWQ keeps each projection group's mean magnitude and a fixed sample of its input rows (awq.py). A hook is told each
row's token index in the calibration set (sample * seq_len + position), so what it keeps does not depend on the
order the steps run in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from mistral_export.errors import MistralExportError
from mistral_export.export.precision.calibration import step_plan
from mistral_export.model.config import ModelConfig
from mistral_export.model.transformer import Block, RMSNorm, rotary_cos_sin, rotary_inv_freq

log = logging.getLogger(__name__)

GROUP_CACHE_BYTES = 256 << 20  # one layer's keys and values for the samples whose decode steps run together

TensorSource = Callable[[str], Tensor]  # internal parameter name -> that tensor, as stored (a copy the caller owns)


class LayerHook(Protocol):
    """What a precision collects from one decoder layer: called with every input of every Linear at every step.

    linear: "attention.wq", "feed_forward.w2", ...; x: [B, S, in]; tokens: [B, S] each row's token index in the
    calibration set (sample * seq_len + position)."""

    def observe(self, linear: str, x: Tensor, tokens: Tensor) -> None: ...


class ChannelMaxima:
    """max |x| per input channel of each Linear of a layer: SmoothQuant's statistic (its max is the tensor's amax)."""

    def __init__(self) -> None:
        self.maxima: dict[str, Tensor] = {}

    def observe(self, linear: str, x: Tensor, tokens: Tensor) -> None:
        m = x.detach().abs().flatten(0, -2).amax(0).float()
        self.maxima[linear] = torch.maximum(self.maxima[linear], m) if linear in self.maxima else m


@dataclass
class CalibratedLayer:
    index: int
    block: Block  # fp32 on the calibration device, as loaded; the consumer may change its weights in place
    hooks: list  # the LayerHooks made for this layer, after every step ran through it


class LayerByLayer:
    """Runs calibration samples (token ids, all of one length) through a model one decoder layer at a time."""

    def __init__(
        self, source: TensorSource, config: ModelConfig, samples: list[list[int]], device: str = "cpu", progress=None
    ):
        if len({len(s) for s in samples}) != 1:
            raise AssertionError("calibration samples must have one length")
        self.source, self.config, self.device, self.progress = source, config, torch.device(device), progress
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MistralExportError("--calib-device cuda: no CUDA device is available to this torch")
        self.ids = torch.tensor(samples, dtype=torch.int64)
        self.plan = step_plan(self.ids.shape[1], config.cache_capacity)
        c = config
        per_sample = 2 * c.num_kv_heads * c.cache_capacity * c.head_dim * 4
        self.group = max(1, min(len(samples), GROUP_CACHE_BYTES // per_sample))
        self.inv_freq = rotary_inv_freq(config, self.device)
        self.hidden: Tensor | None = None  # after layers(): the last layer's outputs

    def layers(self, hooks: Sequence[Callable[[], LayerHook]] = (ChannelMaxima,)) -> Iterator[CalibratedLayer]:
        """Each decoder layer after the calibration ran through it; its outputs are computed before it is yielded,
        from the weights as loaded, and the layer is freed when the consumer asks for the next one."""
        c = self.config
        with torch.inference_mode():
            embedding = self.source("tok_embeddings.weight")
            hidden = embedding[self.ids].to(self.device, torch.float32)
            del embedding
        started = time.perf_counter()
        task = (
            None
            if self.progress is None
            else self.progress.add_task(f"calibration: layer 1/{c.num_layers}", total=c.num_layers)
        )
        try:
            for index in range(c.num_layers):
                block = self._load_block(index)
                made = [make() for make in hooks]
                with torch.inference_mode():
                    outputs = self._run(block, hidden, made)
                layer = CalibratedLayer(index, block, made)
                yield layer
                # Freed now, though the consumer's loop variable still names it until the next layer is yielded.
                layer.block = layer.hooks = None
                del block, made, layer
                hidden = outputs
                done = index + 1
                elapsed = time.perf_counter() - started
                eta = _minutes(elapsed / done * (c.num_layers - done))
                log.info("calibrated layer %d/%d (%s elapsed, ETA %s)", done, c.num_layers, _minutes(elapsed), eta)
                if task is not None:
                    self.progress.update(
                        task,
                        advance=1,
                        description=(f"calibration: layer {min(done + 1, c.num_layers)}/{c.num_layers}, ETA {eta}"),
                    )
        finally:
            if task is not None:
                self.progress.remove_task(task)
        self.hidden = hidden

    def final_norm_inputs(self, last_token_logits: bool) -> Tensor:
        """What the output projection reads over the calibration steps: norm(hidden) of every token, or of each
        step's last token when the graph keeps only the last position's logits."""
        norm = RMSNorm(self.config.hidden_size, self.config.rms_norm_eps).to(self.device)
        with torch.no_grad():
            norm.weight.copy_(self.source("norm.weight"))
        hidden = self.hidden
        if last_token_logits:
            hidden = hidden[:, [start + length - 1 for start, length in self.plan]]
        with torch.inference_mode():
            return norm(hidden)

    def _load_block(self, index: int) -> Block:
        with torch.device("meta"):
            block = Block(self.config)
        for name, _ in list(block.named_parameters()):
            module_name, _, attr = name.rpartition(".")
            tensor = self.source(f"layers.{index}.{name}").to(self.device, torch.float32)
            block.get_submodule(module_name)._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        return block.eval()

    def _run(self, block: Block, hidden: Tensor, hooks: list) -> Tensor:
        """The layer's outputs over every step of every sample; hooks observe every Linear's input."""
        c = self.config
        handles = []
        tokens = None  # the running step's token indices, [B, S]
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):

                def observe(module, args, name=name):
                    for hook in hooks:
                        hook.observe(name, args[0], tokens)

                handles.append(module.register_forward_pre_hook(observe))
        outputs = torch.empty_like(hidden)
        shape = (c.num_kv_heads, c.cache_capacity, c.head_dim)
        try:
            for first in range(0, hidden.shape[0], self.group):
                rows = slice(first, min(first + self.group, hidden.shape[0]))
                count = rows.stop - rows.start
                keys = torch.zeros((count, *shape), device=self.device)
                values = torch.zeros((count, *shape), device=self.device)
                for start, length in self.plan:
                    span = slice(start, start + length)
                    # Prefill chunks one sample at a time (attention scores of a chunk are the large buffer here);
                    # decode steps of the whole group at once.
                    for part in [slice(i, i + 1) for i in range(count)] if length > 1 else [slice(0, count)]:
                        x = hidden[rows][part, span]
                        past_len = torch.full((x.shape[0],), start, dtype=torch.int64, device=self.device)
                        positions = past_len.unsqueeze(1) + torch.arange(length, device=self.device)
                        first_sample = rows.start + part.start
                        samples = torch.arange(first_sample, first_sample + x.shape[0], device=self.device)
                        tokens = samples.unsqueeze(1) * hidden.shape[1] + positions
                        cos, sin = rotary_cos_sin(positions, self.inv_freq, x.dtype)
                        out, _ = block(x, cos, sin, past_len, (keys[part], values[part]))
                        outputs[rows.start + part.start : rows.start + part.stop, span] = out
        finally:
            for handle in handles:
                handle.remove()
        return outputs


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"
