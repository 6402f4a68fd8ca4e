"""The eager model against Hugging Face MistralForCausalLM (eager attention), fp32, on sequences of 3W+5."""

import pytest
import torch

from mistral_export.errors import MistralExportError
from mistral_export.model.checkpoint import load_model, random_model
from mistral_export.model.transformer import allocate_cache

from conftest import small_config
from hf_reference import hf_logits, hf_twin

TOL = 1e-4

CONFIGS = [
    small_config(head_dim=32, heads=4, kv_heads=4, window=16),  # GQA ratio 1
    small_config(head_dim=128, heads=8, kv_heads=2, window=37),  # ratio 4
    small_config(head_dim=32, heads=8, kv_heads=1, window=37),  # ratio 8
    small_config(head_dim=128, heads=8, kv_heads=1, window=16),  # ratio 8, head_dim 128
]


def random_ids(vocab, length, seed, batch=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=[*CONFIGS, "tiny"], ids=lambda c: c if isinstance(c, str) else c.name)
def case(request):
    if request.param == "tiny":
        from conftest import TINY_AVAILABLE

        if not TINY_AVAILABLE:
            pytest.skip("tiny fixture not trained")
        model = load_model("tiny")
    else:
        model = random_model(request.param, seed=1)
    config = model.config
    length = 3 * config.sliding_window + 5
    ids = random_ids(config.vocab_size, length, seed=2, batch=2)
    hf = hf_twin(model)
    return model, ids, hf_logits(hf, ids)


def run_chunks(model, ids, chunk):
    batch, length = ids.shape
    cache = allocate_cache(model.config, batch)
    outs = []
    with torch.no_grad():
        for start in range(0, length, chunk):
            logits, _ = model(ids[:, start : start + chunk], torch.full((batch,), start), cache)
            outs.append(logits)
    return torch.cat(outs, dim=1), cache


def test_window_matters(case):
    """The 3W+5 sequence really exercises the window: dropping it changes the logits."""
    model, ids, ref = case
    unwindowed = hf_twin_without_window(model)
    assert (hf_logits(unwindowed, ids) - ref).abs().max() > 1e-2


def hf_twin_without_window(model):
    from mistral_export.model.transformer import Transformer

    clone = Transformer(model.config.replace(sliding_window=None))
    clone.load_state_dict(model.state_dict())
    return hf_twin(clone)


def test_full_prefill(case):
    model, ids, ref = case
    logits, _ = run_chunks(model, ids, ids.shape[1])
    assert (logits - ref).abs().max() <= TOL


def test_decode_token_by_token(case):
    model, ids, ref = case
    logits, _ = run_chunks(model, ids, 1)
    assert (logits - ref).abs().max() <= TOL


@pytest.mark.parametrize("relative", ["smaller", "equal", "larger"])
def test_chunked_prefill(case, relative):
    model, ids, ref = case
    window = model.config.sliding_window
    chunk = {"smaller": window // 3, "equal": window, "larger": window + window // 2 + 1}[relative]
    logits, cache = run_chunks(model, ids, chunk)
    assert (logits - ref).abs().max() <= TOL
    # The ring after any chunking equals the ring after one full prefill, and holds exactly C slots.
    _, full_cache = run_chunks(model, ids, ids.shape[1])
    for (k, v), (fk, fv) in zip(cache, full_cache):
        assert k.shape[2] == model.config.cache_capacity == window
        torch.testing.assert_close(k, fk, atol=1e-5, rtol=0)
        torch.testing.assert_close(v, fv, atol=1e-5, rtol=0)


def test_batched_decode_at_different_positions(case):
    model, ids, ref = case
    config = model.config
    starts = [config.sliding_window + 3, 2]  # the two sequences sit at different positions
    caches = []
    first_logits = []
    with torch.no_grad():
        for b, start in enumerate(starts):
            cache = allocate_cache(config, 1)
            logits, _ = model(ids[b : b + 1, :start], torch.tensor([0]), cache)
            caches.append(cache)
            first_logits.append(logits)
        cache = [
            (torch.cat([c[i][0] for c in caches]), torch.cat([c[i][1] for c in caches]))
            for i in range(config.num_layers)
        ]
        steps = ids.shape[1] - max(starts)
        for t in range(steps):
            positions = torch.tensor([s + t for s in starts])
            tokens = torch.stack([ids[b, p] for b, p in enumerate(positions)]).view(2, 1)
            logits, _ = model(tokens, positions, cache)
            for b, p in enumerate(positions):
                assert (logits[b, 0] - ref[b, p]).abs().max() <= TOL, (b, int(p))


def test_no_window_config_matches_hf_and_refuses_overflow():
    config = small_config(head_dim=32, heads=8, kv_heads=2, window=None, max_context=40).replace(rope_theta=1e6)
    model = random_model(config, seed=3)
    ids = random_ids(config.vocab_size, 40, seed=4)
    ref = hf_logits(hf_twin(model), ids)
    logits, cache = run_chunks(model, ids, 7)
    assert (logits - ref).abs().max() <= TOL
    with pytest.raises(MistralExportError, match="exceeds the cache capacity 40"):
        model(ids[:, :1], torch.tensor([40]), cache)
