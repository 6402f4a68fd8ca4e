"""Hugging Face transformers' MistralForCausalLM, eager attention, with our model's weights: the external reference."""

import torch
from transformers import MistralConfig, MistralForCausalLM

from mistral_export.model.checkpoint import internal_to_hf
from mistral_export.model.transformer import Transformer


def hf_twin(model: Transformer) -> MistralForCausalLM:
    settings = {k: v for k, v in model.config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    config = MistralConfig(**settings)
    config._attn_implementation = "eager"
    hf = MistralForCausalLM(config).eval()
    hf.load_state_dict({internal_to_hf(n): p.detach().float() for n, p in model.named_parameters()}, strict=True)
    return hf


@torch.no_grad()
def hf_logits(hf: MistralForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    return hf(ids).logits.float()
