"""W8A8 SmoothQuant, layer by layer: the weight stream of the int8 precision.

For each decoder layer (layerwise.LayerByLayer: the calibration ran through it, fp32): SmoothQuant's factors
from its Linears' input channel maxima, folded into the layer (smoothquant.smooth_block); each Linear's
activation range after smoothing, max_j(max|x_j| / s_j) (smoothing divides channel j of the input by s_j, so
the range follows from the statistics, without a second run); then the layer's tensors go to the writer
(int8.Int8Weights quantizes the GEMM weights as they pass) and the layer is freed. The output projection's
range is the final norm's output over the same steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import Tensor

from mistral_export.export.precision.layerwise import LayerByLayer, TensorSource
from mistral_export.export.precision.smoothquant import smooth_block
from mistral_export.model.config import ModelConfig


@dataclass
class W8A8Statistics:
    activation_max: dict[str, float] = field(default_factory=dict)  # Linear ("layers.0.attention.wq") → max |x|
    smoothing: dict[str, Tensor] = field(default_factory=dict)  # Linear → its input's divisor per channel


def smoothquant_tensors(
    source: TensorSource,
    config: ModelConfig,
    samples: list[list[int]],
    alpha: float | None,
    statistics: W8A8Statistics,
    *,
    last_token_logits: bool = False,
    device: str = "cpu",
    progress=None,
) -> Iterator[tuple[str, Tensor]]:
    """(name, fp32 tensor) of every parameter, each layer smoothed after its calibration; fills `statistics`."""
    yield "tok_embeddings.weight", source("tok_embeddings.weight")
    layers = LayerByLayer(source, config, samples, device, progress)
    for layer in layers.layers():
        maxima = layer.hooks[0].maxima
        divisors = smooth_block(layer.block, maxima, alpha, config) if alpha is not None else {}
        prefix = f"layers.{layer.index}."
        for linear, channel_max in maxima.items():
            if linear in divisors:
                channel_max = channel_max / divisors[linear].to(channel_max.device)
                statistics.smoothing[prefix + linear] = divisors[linear].cpu()
            statistics.activation_max[prefix + linear] = float(channel_max.max())
        for name, tensor in layer.block.named_parameters():
            yield prefix + name, tensor.detach().cpu()
    statistics.activation_max["output"] = float(layers.final_norm_inputs(last_token_logits).abs().max())
    yield "norm.weight", source("norm.weight")
    yield "output.weight", source("output.weight")
