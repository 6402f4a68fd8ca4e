"""SmoothQuant (Xiao et al., 2023) as an exact weight transform of the eager model, done before export.

Per-tensor INT8 activations lose the small channels when a few channels carry outliers. SmoothQuant
divides each input channel j of a GEMM by s_j = max|X_j|^α / max|W_j|^(1−α) and multiplies the
weights' column j by s_j: the product is unchanged and the activation range flattens. The division
is folded into whatever produces X, so the graph gains no node:

- wq/wk/wv (one activation) ← attention_norm's weight; w1/w3 ← ffn_norm's weight;
- w2's input (silu(w1 x) · w3 x) ← w3's rows;
- wo's input (the attention output, a weighted sum of v) ← wv's rows. One v channel feeds the same
  channel of every query head of its GQA group, so the factor is shared by the group (maxima over it).

No library does this for this graph (ONNX Runtime's needs Intel neural-compressor; ModelOpt's torch
version keeps `pre_quant_scale` buffers, which an export from parameters drops), hence this module.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mistral_export.model.config import ModelConfig
from mistral_export.model.transformer import Block, Transformer

MIN_FACTOR = 1e-5


def smoothing_factors(activation_max: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1−α) over the weights' columns j (channels never seen get 1)."""
    weight_max = torch.stack([column_abs_max(w) for w in weights]).amax(0)
    factors = activation_max.float().clamp(min=MIN_FACTOR).pow(alpha) / weight_max.clamp(min=MIN_FACTOR).pow(1 - alpha)
    return torch.where(activation_max > 0, factors.clamp(min=MIN_FACTOR), torch.ones_like(factors))


def smooth(model: Transformer, maxima: dict[str, Tensor], alpha: float) -> None:
    """Fold SmoothQuant's factors into MODEL's weights, in place (outputs equal up to float rounding).

    `maxima`: max |x| per input channel of each Linear over calibration steps ("layers.0.attention.wq" -> [in]).
    """
    for i, block in enumerate(model.layers):
        prefix = f"layers.{i}."
        smooth_block(
            block, {k.removeprefix(prefix): v for k, v in maxima.items() if k.startswith(prefix)}, alpha, model.config
        )


def column_abs_max(weight: Tensor) -> Tensor:
    """max |W[:, j]| per column, fp32, without an |W| copy of the weight (a layer's w1 and w3 are 0.5 GB in fp32)."""
    w = weight.detach()
    return torch.maximum(w.amax(0), w.amin(0).neg()).float()


@torch.no_grad()
def smooth_block(block: Block, maxima: dict[str, Tensor], alpha: float, c: ModelConfig) -> dict[str, Tensor]:
    """Fold SmoothQuant's factors into one decoder layer, in place; `maxima` by Linear ("attention.wq" -> [in]).

    Returns each Linear's input divisor per channel (its input is now x / factor): what the smoothed activations'
    ranges follow from.
    """
    attention, ffn = block.attention, block.feed_forward
    divisors = {}
    s = smoothing_factors(
        maxima["attention.wq"], [attention.wq.weight, attention.wk.weight, attention.wv.weight], alpha
    )
    _fold(block.attention_norm.weight, s, [attention.wq.weight, attention.wk.weight, attention.wv.weight])
    divisors.update({"attention.wq": s, "attention.wk": s, "attention.wv": s})

    s = smoothing_factors(maxima["feed_forward.w1"], [ffn.w1.weight, ffn.w3.weight], alpha)
    _fold(block.ffn_norm.weight, s, [ffn.w1.weight, ffn.w3.weight])
    divisors.update({"feed_forward.w1": s, "feed_forward.w3": s})

    s = smoothing_factors(maxima["feed_forward.w2"], [ffn.w2.weight], alpha)
    ffn.w3.weight.div_(s.unsqueeze(1).to(ffn.w3.weight.dtype))
    ffn.w2.weight.mul_(s.to(ffn.w2.weight.dtype))
    divisors["feed_forward.w2"] = s

    # wo's input channels (h, d); the factor of kv head g's channel d is shared by the query heads of g.
    group, d = c.group_size, c.head_dim
    x_max = maxima["attention.wo"].view(c.num_kv_heads, group, d).amax(1)  # [Hkv, D]
    w_max = column_abs_max(attention.wo.weight).view(c.num_kv_heads, group, d).amax(1)
    s = smoothing_factors(x_max.flatten(), [w_max.flatten().unsqueeze(0)], alpha).view(c.num_kv_heads, 1, d)
    attention.wv.weight.div_(s.reshape(-1, 1).to(attention.wv.weight.dtype))
    per_channel = s.expand(c.num_kv_heads, group, d).reshape(-1)
    attention.wo.weight.mul_(per_channel.to(attention.wo.weight.dtype))
    divisors["attention.wo"] = per_channel
    return divisors


def _fold(norm_weight: Tensor, factors: Tensor, consumers: list[Tensor]) -> None:
    norm_weight.div_(factors.to(norm_weight.dtype))
    for weight in consumers:
        weight.mul_(factors.to(weight.dtype))
