"""Whole-model calibration, the reference that layer-by-layer calibration (export/precision/layerwise.py) must
equal: every step of every sample through the whole eager model, as a sequence is served."""

from __future__ import annotations

import torch
from torch import nn

from mistral_export.export.precision.calibration import step_plan
from mistral_export.model.transformer import allocate_cache


def whole_model_steps(model, samples):
    """Every step of every sample through the whole model, as a sequence is served; yields the inputs and the cache
    before the step, then runs it."""
    with torch.inference_mode():
        for sample in samples:
            cache = allocate_cache(model.config, 1)
            for start, length in step_plan(len(sample), model.config.cache_capacity):
                ids, past_len = torch.tensor([sample[start : start + length]]), torch.tensor([start])
                yield ids, past_len, cache
                model(ids, past_len, cache)


def whole_model_maxima(model, samples) -> dict[str, torch.Tensor]:
    """max |x| per input channel of every Linear of the whole model over the calibration steps."""
    maxima, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):

            def observe(module, args, name=name):
                m = args[0].abs().flatten(0, -2).amax(0)
                maxima[name] = torch.maximum(maxima[name], m) if name in maxima else m

            hooks.append(module.register_forward_pre_hook(observe))
    for _ in whole_model_steps(model, samples):
        pass
    for hook in hooks:
        hook.remove()
    return maxima


def whole_model_group_inputs(model, samples) -> list:
    """Per layer, AWQ's statistics (awq.GroupInputs) over every step of the whole model, each row told its token
    index in the calibration set."""
    from mistral_export.export.precision.awq import GROUP_INPUTS, GroupInputs

    seq_len = len(samples[0])
    collected = [GroupInputs(len(samples) * seq_len) for _ in model.layers]
    tokens = {}
    hooks = [
        block.get_submodule(name).register_forward_pre_hook(
            lambda module, args, group=group, name=name: group.observe(name, args[0], tokens["now"])
        )
        for block, group in zip(model.layers, collected)
        for name in GROUP_INPUTS
    ]
    with torch.inference_mode():
        for index, sample in enumerate(samples):
            cache = allocate_cache(model.config, 1)
            for start, length in step_plan(seq_len, model.config.cache_capacity):
                tokens["now"] = index * seq_len + torch.arange(start, start + length).unsqueeze(0)
                model(torch.tensor([sample[start : start + length]]), torch.tensor([start]), cache)
    for hook in hooks:
        hook.remove()
    return collected
