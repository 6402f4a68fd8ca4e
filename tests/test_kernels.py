"""Triton kernels vs the torch reference of the op contract (mistral_export/model/ops.py).

On CPU the kernels run under Triton's interpreter. TRITON_INTERPRET must be set before triton is first
imported, and other test modules (test_aot_ptx.py) need the real compiler in the same pytest process, so the
interpreter cases run in one subprocess: this file executed as a script. Each case is still its own test.

Cases cross the ring's wrap-around, use chunks shorter and longer than the window, GQA ratios 1, 4 and 8, a batch
with different past_len, no window, the last position a runner allows (2^31 - 1), fp16 inputs whose sums or scores
only fit fp32 (the softmax must accumulate in fp32), a non-contiguous q, several decode splits and tiles, and an
output buffer pre-filled with NaN so that every element must be written. Under the
interpreter the cache update's stores are recorded: every kept element is written exactly once per launch (on a GPU,
two writes to one slot race), which is what the "last min(S, C) rows" rule guarantees; into an output buffer of
its own (TensorRT without aliasing) the whole cache arrives, each element written once.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from mistral_export.op_contract import MAX_POSITION

REPO_ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}  # max |Δ| / max |reference|

# Tile overrides keep the interpreter fast while still crossing tile and split boundaries at small shapes.
SMALL_CHUNK = (16, 16)
SMALL_SPLITS = {"keys_per_split": 16, "decode_block_n": 16}

ATTENTION_CASES = [
    # decode (S = 1): split path
    dict(id="decode-gqa1-wrap", B=1, Hq=2, Hkv=2, S=1, D=32, C=40, W=40, past=[97], dtype="float32", **SMALL_SPLITS),
    dict(
        id="decode-gqa4-batch-mixed-past",
        B=3,
        Hq=8,
        Hkv=2,
        S=1,
        D=32,
        C=40,
        W=40,
        past=[0, 17, 123],
        dtype="float32",
        **SMALL_SPLITS,
    ),
    dict(
        id="decode-gqa8-fp16", B=2, Hq=8, Hkv=1, S=1, D=32, C=48, W=48, past=[47, 200], dtype="float16", **SMALL_SPLITS
    ),
    dict(
        id="decode-gqa4-fp16-wrap",
        B=2,
        Hq=4,
        Hkv=1,
        S=1,
        D=64,
        C=32,
        W=32,
        past=[5, 77],
        dtype="float16",
        **SMALL_SPLITS,
    ),
    dict(id="decode-no-window", B=2, Hq=4, Hkv=1, S=1, D=16, C=64, W=0, past=[10, 63], dtype="float32", **SMALL_SPLITS),
    dict(id="decode-default-splits", B=2, Hq=4, Hkv=2, S=1, D=32, C=64, W=64, past=[3, 150], dtype="float32"),
    dict(
        id="decode-at-max-position",
        B=2,
        Hq=4,
        Hkv=2,
        S=1,
        D=16,
        C=24,
        W=24,
        past=[MAX_POSITION, 30],
        dtype="float32",
        **SMALL_SPLITS,
    ),
    # chunks / prefill
    dict(
        id="chunk-shorter-than-window-gqa1-wrap",
        B=2,
        Hq=2,
        Hkv=2,
        S=7,
        D=32,
        C=16,
        W=16,
        past=[3, 29],
        dtype="float32",
        chunk=SMALL_CHUNK,
    ),
    dict(
        id="chunk-longer-than-window-gqa4",
        B=2,
        Hq=4,
        Hkv=1,
        S=37,
        D=32,
        C=16,
        W=16,
        past=[0, 21],
        dtype="float32",
        chunk=SMALL_CHUNK,
    ),
    dict(
        id="chunk-gqa8-fp16", B=2, Hq=8, Hkv=1, S=20, D=16, C=24, W=24, past=[5, 50], dtype="float16", chunk=SMALL_CHUNK
    ),
    dict(
        id="chunk-longer-than-window-fp16-wrap",
        B=2,
        Hq=4,
        Hkv=1,
        S=40,
        D=32,
        C=16,
        W=16,
        past=[7, 33],
        dtype="float16",
        chunk=SMALL_CHUNK,
    ),
    dict(
        id="chunk-no-window", B=2, Hq=4, Hkv=2, S=19, D=16, C=64, W=0, past=[0, 30], dtype="float32", chunk=SMALL_CHUNK
    ),
    dict(
        id="prefill-empty-cache", B=1, Hq=4, Hkv=1, S=33, D=32, C=16, W=16, past=[0], dtype="float32", chunk=SMALL_CHUNK
    ),
    dict(
        id="chunk-noncontiguous-q",
        B=2,
        Hq=4,
        Hkv=1,
        S=9,
        D=32,
        C=16,
        W=16,
        past=[2, 40],
        dtype="float32",
        chunk=SMALL_CHUNK,
        noncontiguous=True,
    ),
    dict(
        id="chunk-ending-at-max-position",
        B=2,
        Hq=2,
        Hkv=1,
        S=20,
        D=16,
        C=16,
        W=16,
        past=[MAX_POSITION - 19, 2**40],
        dtype="float32",
        chunk=SMALL_CHUNK,
    ),
    # fp16 I/O whose sums only fit fp32: near-uniform attention over values ~5000, so one key tile already sums past
    # fp16's 65504; the output (their mean) is fine in fp16 only if the softmax accumulates in fp32.
    dict(
        id="chunk-fp16-sums-beyond-fp16",
        B=1,
        Hq=2,
        Hkv=1,
        S=24,
        D=16,
        C=32,
        W=32,
        past=[40],
        dtype="float16",
        chunk=SMALL_CHUNK,
        q_scale=0.05,
        v_offset=5000.0,
    ),
    dict(
        id="decode-fp16-sums-beyond-fp16",
        B=1,
        Hq=2,
        Hkv=1,
        S=1,
        D=16,
        C=32,
        W=32,
        past=[40],
        dtype="float16",
        keys_per_split=32,
        decode_block_n=16,
        q_scale=0.05,
        v_offset=5000.0,
    ),
    # fp16 I/O with scores of magnitude ~100 whose differences of ~1 decide the weights: right only if the scores
    # stay fp32 (fp16's spacing there is 0.0625-0.125). The decode kernel shares the softmax step.
    dict(
        id="chunk-fp16-large-scores",
        B=1,
        Hq=2,
        Hkv=1,
        S=24,
        D=16,
        C=32,
        W=32,
        past=[40],
        dtype="float16",
        chunk=SMALL_CHUNK,
        q_scale=6.0,
        k_scale=6.0,
    ),
    dict(id="chunk-default-tiles-fp16", B=1, Hq=2, Hkv=1, S=18, D=32, C=16, W=16, past=[25], dtype="float16"),
    # The interpreter mishandles bf16 dot products (numpy has no bf16); bf16 is checked on a GPU only.
    dict(id="chunk-bf16", B=2, Hq=4, Hkv=1, S=18, D=32, C=16, W=16, past=[25, 3], dtype="bfloat16", gpu_only=True),
    dict(id="decode-bf16", B=2, Hq=4, Hkv=1, S=1, D=64, C=32, W=32, past=[25, 70], dtype="bfloat16", gpu_only=True),
]

CACHE_CASES = [
    dict(id="cache-wrap", B=2, H=2, S=5, D=32, C=8, past=[3, 9], dtype="float32"),
    dict(id="cache-chunk-longer-than-capacity", B=2, H=2, S=11, D=32, C=8, past=[0, 6], dtype="float32"),
    dict(id="cache-decode-fp16-mixed-past", B=3, H=2, S=1, D=16, C=8, past=[0, 7, 100], dtype="float16"),
    dict(id="cache-long-prefill-fp16", B=1, H=1, S=40, D=64, C=16, past=[0], dtype="float16"),
    dict(id="cache-chunk-at-max-position", B=2, H=1, S=21, D=16, C=8, past=[MAX_POSITION - 20, 2**40], dtype="float32"),
]
# The same updates into an output buffer of its own (TensorRT without aliasing): the whole cache must arrive there,
# old slots copied and new rows written, each element exactly once; one case spans several copy programs.
CACHE_CASES += [{**case, "id": case["id"] + "-separate-output", "separate": True} for case in CACHE_CASES]
CACHE_CASES.append(
    dict(
        id="cache-separate-output-several-copy-programs",
        B=2,
        H=2,
        S=3,
        D=16,
        C=600,
        past=[598, 5],
        dtype="float16",
        separate=True,
    )
)


INTERPRETER_CASES = [c for c in ATTENTION_CASES + CACHE_CASES if not c.get("gpu_only")]


# ------------------------------------------------------------------------------------------------------------
# Running one case (in the worker under the interpreter, or in-process on a GPU)
# ------------------------------------------------------------------------------------------------------------


def _attention_inputs(case: dict, device: str):
    gen = torch.Generator().manual_seed(zlib.crc32(case["id"].encode()))
    dtype = getattr(torch, case["dtype"])
    B, Hq, Hkv, S, D, C = (case[n] for n in ("B", "Hq", "Hkv", "S", "D", "C"))

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=gen) * scale + offset).to(dtype).to(device)

    q_scale, k_scale, v_offset = (
        case.get(name, default) for name, default in (("q_scale", 1.0), ("k_scale", 1.0), ("v_offset", 0.0))
    )
    if case.get("noncontiguous"):
        q = rand(B, S, Hq, D, scale=q_scale).transpose(1, 2)  # [B,Hq,S,D] view with S-major strides
    else:
        q = rand(B, Hq, S, D, scale=q_scale)
    k, v = rand(B, Hkv, S, D, scale=k_scale), rand(B, Hkv, S, D, offset=v_offset)
    k_cache, v_cache = rand(B, Hkv, C, D, scale=k_scale), rand(B, Hkv, C, D, offset=v_offset)
    past = torch.tensor(case["past"], dtype=torch.int64, device=device)
    return q, k, v, k_cache, v_cache, past


def run_attention_case(case: dict, device: str) -> float:
    """Max |kernel − reference| / max |reference| on random inputs, output pre-filled with NaN."""
    from mistral_export.model.ops import sliding_window_attention_reference
    from mistral_export.plugins import kernels

    q, k, v, k_cache, v_cache, past = _attention_inputs(case, device)
    scale = case["D"] ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device)
    overrides = {}
    if "chunk" in case:
        overrides["chunk"] = kernels.ChunkConfig(*case["chunk"], num_warps=1, num_stages=1)
    for name in ("keys_per_split", "decode_block_n"):
        if name in case:
            overrides[name] = case[name]
    kernels.sliding_window_attention(q, k, v, k_cache, v_cache, past, case["W"], scale, out=out, **overrides)
    expected = sliding_window_attention_reference(q, k, v, k_cache, v_cache, past, case["W"], scale).float()
    if torch.isnan(out).any():
        return float("nan")
    return ((out.float() - expected).abs().max() / expected.abs().max()).item()


@contextlib.contextmanager
def recorded_stores():
    """Yields a list that receives the addresses of every element a kernel stores under the interpreter.

    Wraps the interpreter's store (triton.runtime.interpreter.InterpreterBuilder.create_masked_store, not public
    API): if a Triton upgrade bypasses it, nothing is recorded and the count check of the caller fails.
    """
    from triton.runtime.interpreter import InterpreterBuilder

    original = InterpreterBuilder.create_masked_store
    addresses = []

    def record(self, ptrs, value, mask, cache_policy):
        addresses.append(np.broadcast_to(ptrs.data, mask.data.shape)[mask.data].copy())
        return original(self, ptrs, value, mask, cache_policy)

    InterpreterBuilder.create_masked_store = record
    try:
        yield addresses
    finally:
        InterpreterBuilder.create_masked_store = original


def run_cache_case(case: dict, device: str) -> float | str:
    """Max |kernel − reference| over the whole cache (exact copy expected: 0).

    In place (the output is the cache) or, with `separate`, into an output buffer pre-filled with NaN (the input
    cache must stay untouched). Under the interpreter also: each element of the output is stored exactly once per
    launch (on a GPU, two writes to one slot race): in place the B·H·min(S, C)·D kept new elements (a row the chunk
    itself overwrites is never written), into a separate output all B·H·C·D.
    """
    from mistral_export.model.ops import rolling_cache_update_reference
    from mistral_export.plugins import kernels

    gen = torch.Generator().manual_seed(zlib.crc32(case["id"].encode()))
    dtype = getattr(torch, case["dtype"])
    cache = torch.randn(case["B"], case["H"], case["C"], case["D"], generator=gen).to(dtype).to(device)
    new = torch.randn(case["B"], case["H"], case["S"], case["D"], generator=gen).to(dtype).to(device)
    past = torch.tensor(case["past"], dtype=torch.int64, device=device)
    expected = rolling_cache_update_reference(cache, new, past)
    original = cache.clone()
    out = torch.full_like(cache, float("nan")) if case.get("separate") else None
    with recorded_stores() if device == "cpu" else contextlib.nullcontext() as stores:
        result = kernels.rolling_cache_update(cache, new, past, out=out)
    if out is not None and not torch.equal(cache, original):
        return "the input cache was modified although the output has its own buffer"
    if device == "cpu":
        written = np.concatenate(stores) if stores else np.empty(0, dtype=np.uint64)
        kept = case["B"] * case["H"] * (case["C"] if out is not None else min(case["S"], case["C"])) * case["D"]
        if written.size != kept or np.unique(written).size != kept:
            return (
                f"stores: {written.size} element writes to {np.unique(written).size} addresses; "
                f"expected {kept} writes, each to its own address"
            )
    return (result.float() - expected.float()).abs().max().item()


def _worker() -> None:
    """Runs every case under the interpreter and prints {id: error or message} as JSON on the last line."""
    results = {}
    for case in INTERPRETER_CASES:
        run = run_attention_case if "Hq" in case else run_cache_case
        try:
            results[case["id"]] = run(case, "cpu")
        except Exception as exc:  # noqa: BLE001 - reported per case by the test that owns it
            results[case["id"]] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(results))


# ------------------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=170
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(case: dict, result) -> None:
    assert not isinstance(result, str), result
    tolerance = 0.0 if "Hq" not in case else TOLERANCE[case["dtype"]]
    assert result == result, "output has NaN: some element was never written"
    assert result <= tolerance, f"{case['id']}: relative error {result:.3g} > {tolerance:g}"


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda c: c["id"])
def test_interpreter_matches_reference(interpreter_results, case):
    _check(case, interpreter_results[case["id"]])


@pytest.mark.gpu
@pytest.mark.parametrize("case", ATTENTION_CASES + CACHE_CASES, ids=lambda c: c["id"])
def test_cuda_matches_reference(case):
    run = run_attention_case if "Hq" in case else run_cache_case
    _check(case, run(case, "cuda"))


# Input validation happens before any launch, so it runs in-process without a GPU.


def _attention_args(D=32, dtype=torch.float32):
    q = torch.randn(1, 4, 2, D, dtype=dtype)
    kv = torch.randn(1, 1, 2, D, dtype=dtype)
    cache = torch.randn(1, 1, 8, D, dtype=dtype)
    return q, kv, kv, cache, cache, torch.tensor([0])


def test_rejects_unsupported_head_dim():
    from mistral_export.plugins import kernels

    with pytest.raises(ValueError, match="q head_dim must be one of"):
        kernels.sliding_window_attention(*_attention_args(D=48), 8, 0.1)


def test_rejects_unsupported_dtype():
    from mistral_export.plugins import kernels

    q, k, v, kc, vc, past = _attention_args()
    with pytest.raises(ValueError, match="k must have the dtype of q"):
        kernels.sliding_window_attention(q, k.half(), v, kc, vc, past, 8, 0.1)
    with pytest.raises(ValueError, match="q must be float16, bfloat16 or float32"):
        kernels.sliding_window_attention(q.double(), k.double(), v.double(), kc.double(), vc.double(), past, 8, 0.1)


def test_rejects_bad_past_len_and_gqa():
    from mistral_export.plugins import kernels

    q, k, v, kc, vc, past = _attention_args()
    with pytest.raises(ValueError, match="past_len must be int64"):
        kernels.sliding_window_attention(q, k, v, kc, vc, past.int(), 8, 0.1)
    with pytest.raises(ValueError, match="must be a multiple of kv heads"):
        two = [t.repeat(1, 2, 1, 1) for t in (k, v, kc, vc)]  # 2 kv heads for 3 q heads
        kernels.sliding_window_attention(q[:, :3], *two, past, 8, 0.1)
    with pytest.raises(ValueError, match="cache head_dim must be one of"):
        kernels.rolling_cache_update_(torch.zeros(1, 1, 8, 24), torch.zeros(1, 1, 1, 24), past)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run by tests/test_kernels.py with TRITON_INTERPRET=1")
    _worker()
