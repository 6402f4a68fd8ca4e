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

It runs inside the layer-by-layer calibration (layerwise.py): `GroupInputs` collects one layer's statistics, the
layer is searched and folded while it is loaded, and `awq_tensors` streams the scaled weights to the writer.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from mistral_export.export.precision.int4 import round_to_grid_
from mistral_export.export.precision.layerwise import LayerByLayer, TensorSource
from mistral_export.model.config import ModelConfig
from mistral_export.model.transformer import Block

GRID = 20
# Calibration tokens per projection the search's loss is measured on (the mean magnitude uses every token): the
# search costs 2 * GRID * MAX_ROWS multiply-adds per weight, so for Mistral 7B 512 rows are ~140 TFLOP, about
# ten minutes of fp32 GEMM on 2 cores; enough rows to rank 20 candidates.
MAX_ROWS = 512
SEARCH_ELEMENTS = 1 << 24  # weight elements per block of the search's error (64 MiB of fp32 per temporary)
# The first Linear of each projection group: the one whose input the group shares.
GROUP_INPUTS = ("attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2")


class LayerInputs:
    """One projection input's calibration statistics: mean |x| per channel over every token, and the rows of a fixed
    set of tokens (evenly spaced over the calibration set, so the same rows whatever order the steps run in)."""

    def __init__(self, kept_tokens: Tensor):
        self.kept_tokens = kept_tokens  # sorted token indices whose rows the loss is measured on
        self.total: Tensor | None = None
        self.count = 0
        self.rows: list[tuple[Tensor, Tensor]] = []  # (token indices, rows)

    def add(self, x: Tensor, tokens: Tensor) -> None:
        x = x.detach().float().flatten(0, -2)
        magnitude = x.abs().sum(0)
        self.total = magnitude if self.total is None else self.total + magnitude
        self.count += x.shape[0]
        tokens = tokens.flatten().to(self.kept_tokens.device)
        kept = torch.isin(tokens, self.kept_tokens)
        if kept.any():
            self.rows.append((tokens[kept], x[kept.to(x.device)]))

    def mean(self) -> Tensor:
        return self.total / max(self.count, 1)

    def sample(self) -> Tensor:
        tokens = torch.cat([t for t, _ in self.rows])
        return torch.cat([r for _, r in self.rows])[tokens.argsort().to(self.rows[0][1].device)]


def kept_tokens(total_tokens: int) -> Tensor:
    """The token indices whose rows AWQ's loss is measured on: MAX_ROWS evenly spaced over the calibration set."""
    return torch.unique(torch.linspace(0, total_tokens - 1, min(MAX_ROWS, total_tokens)).long())


class GroupInputs:
    """A layerwise.LayerHook: LayerInputs of each projection group's shared input (GROUP_INPUTS)."""

    def __init__(self, total_tokens: int):
        tokens = kept_tokens(total_tokens)
        self.inputs = {name: LayerInputs(tokens) for name in GROUP_INPUTS}

    def observe(self, linear: str, x: Tensor, tokens: Tensor) -> None:
        if linear in self.inputs:
            self.inputs[linear].add(x, tokens)


def best_scales(
    x_mean: Tensor, x: Tensor, weights: list[Tensor], block_size: int, expand=lambda s: s
) -> tuple[Tensor, float]:
    """AWQ's grid search for one group: (scales over x's channels, the exponent chosen).

    `weights` ([N_i, K] each) are the group's Linears; `expand` maps a candidate scale vector onto K (wo: one factor
    per kv channel shared by the query heads of its group). The output error is summed over blocks of output rows
    (rounding is per row, so blocks are independent): no fp32 temporary larger than a block, whatever the layer.
    """
    chunks = [
        chunk for weight in weights for chunk in weight.detach().split(max(1, SEARCH_ELEMENTS // weight.shape[1]))
    ]
    references = [x @ chunk.float().T for chunk in chunks]
    best, chosen, error = torch.ones_like(x_mean), 0.0, float("inf")
    for step in range(GRID):
        exponent = step / GRID
        s = x_mean.clamp(min=1e-4).pow(exponent)
        s = s / (s.max() * s.min()).sqrt()
        k_scale = expand(s)
        x_scaled = x / k_scale  # (x / s) Q(W s)ᵀ: the division on the few rows of x, not on the weight
        loss = 0.0
        for chunk, reference in zip(chunks, references):
            quantized = round_to_grid_(chunk.float() * k_scale, block_size)
            loss += float((x_scaled @ quantized.T).sub_(reference).pow_(2).sum())
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
    qkv = [attention.wq.weight, attention.wk.weight, attention.wv.weight]
    scales["attention.wq"], _ = best_scales(
        inputs["attention.wq"].mean(), inputs["attention.wq"].sample(), qkv, block_size
    )
    w13 = [ffn.w1.weight, ffn.w3.weight]
    scales["feed_forward.w1"], _ = best_scales(
        inputs["feed_forward.w1"].mean(), inputs["feed_forward.w1"].sample(), w13, block_size
    )
    scales["feed_forward.w2"], _ = best_scales(
        inputs["feed_forward.w2"].mean(), inputs["feed_forward.w2"].sample(), [ffn.w2.weight], block_size
    )
    # wo's input channel (h, d) is v's channel (g, d) of h's kv group g: one factor per kv channel.
    hkv, group, d = config.num_kv_heads, config.group_size, config.head_dim
    kv_mean = inputs["attention.wo"].mean().view(hkv, group, d).mean(1).flatten()
    scales["attention.wo"], _ = best_scales(
        kv_mean,
        inputs["attention.wo"].sample(),
        [attention.wo.weight],
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


def awq_tensors(
    source: TensorSource,
    config: ModelConfig,
    samples: list[list[int]],
    block_size: int,
    *,
    device: str = "cpu",
    progress=None,
) -> Iterator[tuple[str, Tensor]]:
    """(name, fp32 tensor) of every parameter, each decoder layer with its AWQ scales folded in, searched on the
    calibration samples one layer at a time."""
    yield "tok_embeddings.weight", source("tok_embeddings.weight")
    total_tokens = len(samples) * len(samples[0])
    for layer in LayerByLayer(source, config, samples, device, progress).layers([lambda: GroupInputs(total_tokens)]):
        apply_layer(layer.block, search_layer(layer.block, layer.hooks[0].inputs, config, block_size), config)
        for name, tensor in layer.block.named_parameters():
            yield f"layers.{layer.index}.{name}", tensor.detach().cpu()
    yield "norm.weight", source("norm.weight")
    yield "output.weight", source("output.weight")
