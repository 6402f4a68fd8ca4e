"""AWQ (Lin et al., 2024): activation-aware per-input-channel scales for INT4 weights, an exact weight transform.

Rounding a weight to 4 bits hurts most where its input channel carries large activations. AWQ multiplies
input channel j of a projection group's weights by s_j and divides the input by s_j (the product is unchanged),
so the salient channels are rounded on a finer grid. s_j = mean|X_j|^a, normalized so max·min = 1, with the
exponent a in {0, 1/20, ..., 19/20} chosen per group to minimize the group's output error
||X Wᵀ − (X/s) Q(W·s)ᵀ||² on the calibration activations (a = 0 is plain round-to-nearest). The division is
folded into the op that produces X, as SmoothQuant's (smoothquant.py) is: attention_norm (wq/wk/wv),
ffn_norm (w1/w3), w3's rows (w2), wv's rows (wo, shared per GQA group). Weight clipping search (the paper's
second step) is not done.

No maintained library runs AWQ's search on a CPU for a model like this one (AutoAWQ is archived and CUDA-only;
llm-compressor and ModelOpt run it on Hugging Face / ModelOpt-wrapped modules and leave quantizer state that an
export from parameters drops: DESIGN.md, "Quantization facts"), hence this module.
`search_layer` works on ONE decoder layer's inputs, so a layer-by-layer calibration loop can call it;
`collect_layer_inputs` gathers those inputs today with forward hooks over the existing calibration steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from mistral_export.export.precision.calibration import Step
from mistral_export.export.precision.int4 import fake_quantize
from mistral_export.model.config import ModelConfig
from mistral_export.model.transformer import Block, Transformer

GRID = 20
# Calibration tokens per projection the search's loss is measured on (the mean magnitude uses every token): the
# search costs 2 * GRID * MAX_ROWS multiply-adds per weight, so for Mistral 7B 512 rows are ~150 TFLOP, about
# an hour on a 16-core CPU; enough rows to rank 20 candidates.
MAX_ROWS = 512
# The first Linear of each projection group: the one whose input the group shares.
GROUP_INPUTS = ("attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2")


class LayerInputs:
    """One projection input's calibration statistics: mean |x| per channel over every token, and a row sample."""

    def __init__(self):
        self.total: Tensor | None = None
        self.count = 0
        self.rows: list[Tensor] = []
        self.kept = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().float().flatten(0, -2)
        magnitude = x.abs().sum(0)
        self.total = magnitude if self.total is None else self.total + magnitude
        self.count += x.shape[0]
        if self.kept < 4 * MAX_ROWS:
            self.rows.append(x)
            self.kept += x.shape[0]

    def mean(self) -> Tensor:
        return self.total / max(self.count, 1)

    def sample(self) -> Tensor:
        rows = torch.cat(self.rows)
        return rows[torch.linspace(0, rows.shape[0] - 1, min(MAX_ROWS, rows.shape[0])).long()]


def collect_layer_inputs(model: Transformer, steps: Iterator[Step]) -> list[dict[str, LayerInputs]]:
    """Per layer, the inputs of each projection group (GROUP_INPUTS) over all calibration steps."""
    collected = [{name: LayerInputs() for name in GROUP_INPUTS} for _ in model.layers]
    hooks = []
    for i, block in enumerate(model.layers):
        for name in GROUP_INPUTS:
            hooks.append(
                block.get_submodule(name).register_forward_pre_hook(
                    lambda module, args, inputs=collected[i][name]: inputs.add(args[0])
                )
            )
    try:
        for _ in steps:  # the generator runs the model on each step after yielding it
            pass
    finally:
        for hook in hooks:
            hook.remove()
    return collected


def best_scales(x_mean: Tensor, x: Tensor, weight: Tensor, block_size: int, expand=lambda s: s) -> tuple[Tensor, float]:
    """AWQ's grid search for one group: (scales over x's channels, the exponent chosen).

    `weight` [N, K] is the group's weights side by side; `expand` maps a candidate scale vector onto K
    (wo: one factor per kv channel shared by the query heads of its group).
    """
    weight = weight.float()
    reference = x @ weight.T
    best, chosen, error = torch.ones_like(x_mean), 0.0, float("inf")
    for step in range(GRID):
        exponent = step / GRID
        s = x_mean.clamp(min=1e-4).pow(exponent)
        s = s / (s.max() * s.min()).sqrt()
        k_scale = expand(s)
        quantized = fake_quantize(weight * k_scale, block_size) / k_scale
        loss = float((x @ quantized.T - reference).pow(2).mean())
        if loss < error:
            best, chosen, error = s, exponent, loss
    return best, chosen


@torch.no_grad()
def search_layer(
    block: Block, inputs: dict[str, LayerInputs], config: ModelConfig, block_size: int
) -> dict[str, Tensor]:
    """The AWQ scales of one decoder layer's four projection groups, keyed by GROUP_INPUTS (not applied)."""
    attention, ffn = block.attention, block.feed_forward
    scales = {}
    qkv = torch.cat([attention.wq.weight, attention.wk.weight, attention.wv.weight])
    scales["attention.wq"], _ = best_scales(
        inputs["attention.wq"].mean(), inputs["attention.wq"].sample(), qkv, block_size
    )
    w13 = torch.cat([ffn.w1.weight, ffn.w3.weight])
    scales["feed_forward.w1"], _ = best_scales(
        inputs["feed_forward.w1"].mean(), inputs["feed_forward.w1"].sample(), w13, block_size
    )
    scales["feed_forward.w2"], _ = best_scales(
        inputs["feed_forward.w2"].mean(), inputs["feed_forward.w2"].sample(), ffn.w2.weight, block_size
    )
    # wo's input channel (h, d) is v's channel (g, d) of h's kv group g: one factor per kv channel.
    hkv, group, d = config.num_kv_heads, config.group_size, config.head_dim
    kv_mean = inputs["attention.wo"].mean().view(hkv, group, d).mean(1).flatten()
    scales["attention.wo"], _ = best_scales(
        kv_mean,
        inputs["attention.wo"].sample(),
        attention.wo.weight,
        block_size,
        expand=lambda s: s.view(hkv, 1, d).expand(hkv, group, d).reshape(-1),
    )
    return scales


@torch.no_grad()
def apply_layer(block: Block, scales: dict[str, Tensor], config: ModelConfig) -> None:
    """Fold one layer's AWQ scales into its weights, in place (its fp32 function unchanged up to rounding)."""
    attention, ffn = block.attention, block.feed_forward
    s = scales["attention.wq"]
    block.attention_norm.weight.div_(s)
    for linear in (attention.wq, attention.wk, attention.wv):
        linear.weight.mul_(s)
    s = scales["feed_forward.w1"]
    block.ffn_norm.weight.div_(s)
    for linear in (ffn.w1, ffn.w3):
        linear.weight.mul_(s)
    s = scales["feed_forward.w2"]
    ffn.w3.weight.div_(s.unsqueeze(1))
    ffn.w2.weight.mul_(s)
    hkv, group, d = config.num_kv_heads, config.group_size, config.head_dim
    s = scales["attention.wo"].view(hkv, 1, d)
    attention.wv.weight.div_(s.reshape(-1, 1))
    attention.wo.weight.mul_(s.expand(hkv, group, d).reshape(-1))


def awq(model: Transformer, steps: Iterator[Step], block_size: int, progress=None) -> None:
    """Search and fold AWQ's scales into MODEL (fp32), layer by layer, in place."""
    collected = collect_layer_inputs(model, steps)
    task = progress.add_task("AWQ search", total=len(model.layers)) if progress is not None else None
    try:
        for block, inputs in zip(model.layers, collected):
            apply_layer(block, search_layer(block, inputs, model.config, block_size), model.config)
            if task is not None:
                progress.advance(task)
    finally:
        if task is not None:
            progress.remove_task(task)
