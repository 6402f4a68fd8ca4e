"""The AOT plugin kernels below TensorRT: their PTX loaded by the CUDA driver and launched as the plugin tells TensorRT
to launch it (run first by benchmarks/gpu_check.sh; needs torch, triton and cuda-python, not TensorRT).

For each kernel the plugin's aot_impl would return (mistral_export/plugins/tensorrt.py): the PTX of
aot.compile_chunk_attention / aot.compile_rolling_cache_update, at the ISA aot.ptx_isa picks for this driver and at
DEFAULT_PTX_ISA (what a build without a driver writes), loaded with cuModuleLoadData; launched with cuLaunchKernel
with the plugin's grid (aot.chunk_attention_grid, aot.rolling_cache_update_grid), block (num_warps * 32), dynamic
shared memory (the kernel's), and arguments in TensorRT's order (inputs, int32 scalars from the plugin's scalar
functions, outputs: aot.launch_arguments). Mistral 7B shapes (fp16, 32 query / 8 KV heads, head_dim 128, window and
cache 4096), S in {1, 7, 45, 300}, positions across the ring's wrap and deep into it, the cache update into the cache
itself (aliased, as with the preview flag) and into a buffer of its own pre-filled with NaN; compared with the torch
reference (whole cache). Then the AOT attention at S = 1 (the chunk kernel: most of its 64-row tile is masked) timed
against the JIT split-decode kernels (kernels.sliding_window_attention) at batch 1 and 8, CUDA events, 8 layers of
distinct caches per call so that the caches do not sit in L2.

Writes aot_driver_check_<gpu>.json and .md to $OUT if set, else benchmarks/results/, with commit, command, versions,
driver and GPU. Exit status 1 when a case fails.
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mistral_export.model.ops import (
    rolling_cache_update_reference,
    sliding_window_attention_reference,
)
from mistral_export.plugins import aot, kernels

from provenance import RESULTS, gpu_tag, provenance
from provenance import markdown as provenance_markdown

HQ, HKV, D, W = 32, 8, 128, 4096
C, GROUP, SCALE = W, HQ // HKV, D**-0.5
SEQS = (1, 7, 45, 300)
PASTS = ([4090, 4095], [10_000, 3])  # chunks crossing the wrap at 4096, one deep in the ring, one near the start
TOLERANCE = 2e-3  # fp16, max |Δ| / max |reference| (tests/test_kernels.py)
LAYERS = 8


def driver():
    try:
        from cuda.bindings import driver as cuda_driver
    except ImportError:  # cuda-python < 12.6
        from cuda import cuda as cuda_driver
    return cuda_driver


def check(result) -> object:
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = driver().cuGetErrorName(err)[1]
        raise RuntimeError(f"CUDA driver error {int(err)} ({name.decode() if isinstance(name, bytes) else name})")
    return values[0] if len(values) == 1 else (values or None)


class Loaded:
    """An AOT kernel's PTX loaded into the current context, launched as TensorRT launches an AOT plugin kernel."""

    def __init__(self, kernel: aot.AotKernel):
        cu = driver()
        self.kernel = kernel
        self.image = ctypes.create_string_buffer(kernel.ptx.encode())  # NUL-terminated, as cuModuleLoadData reads it
        self.module = check(cu.cuModuleLoadData(ctypes.addressof(self.image)))
        self.function = check(cu.cuModuleGetFunction(self.module, kernel.name.encode()))

    def launch(self, grid, pointers: dict[str, int], scalars) -> None:
        cu = driver()
        values, types = aot.launch_arguments(self.kernel, pointers, [int(s) for s in scalars])
        stream = cu.CUstream(torch.cuda.current_stream().cuda_stream)
        check(
            cu.cuLaunchKernel(
                self.function,
                *(int(g) for g in grid),
                self.kernel.block_threads,
                1,
                1,
                self.kernel.shared_mem,
                stream,
                (values, types),
                0,
            )
        )


def attention_pointers(q, k, v, k_cache, v_cache, past_len, out) -> dict[str, int]:
    tensors = (q, k, v, k_cache, v_cache, past_len, out)
    return dict(zip(aot.ATTENTION_INPUTS + aot.ATTENTION_OUTPUTS, (t.data_ptr() for t in tensors), strict=True))


def run_attention(loaded: Loaded, q, k, v, k_cache, v_cache, past_len, out) -> None:
    batch, seq = q.shape[0], q.shape[2]
    tile = aot.chunk_attention_tile("fp16", D)
    grid = aot.chunk_attention_grid(batch, HKV, seq, GROUP, tile)
    scalars = aot.chunk_attention_scalars(HQ, HKV, seq, C, D, W)
    loaded.launch(grid, attention_pointers(q, k, v, k_cache, v_cache, past_len, out), scalars)


def run_cache_update(loaded: Loaded, cache, new, past_len, after, out) -> None:
    batch, seq = new.shape[0], new.shape[2]
    grid = aot.rolling_cache_update_grid(batch, HKV, seq, C)
    scalars = aot.rolling_cache_update_scalars(HKV, seq, C, D)
    pointers = dict(
        zip(
            aot.CACHE_UPDATE_INPUTS + aot.CACHE_UPDATE_OUTPUTS,
            (t.data_ptr() for t in (cache, new, past_len, after, out)),
            strict=True,
        )
    )
    loaded.launch(grid, pointers, scalars)


def rel_err(out, ref) -> float:
    if torch.isnan(out).any():
        return float("nan")
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def correctness(isa: int) -> list[dict]:
    os.environ["MISTRAL_EXPORT_PTX_ISA"] = str(isa)
    capability = aot.target_capability()
    attention = Loaded(aot.compile_chunk_attention("fp16", D, GROUP, SCALE, capability))
    update = Loaded(aot.compile_rolling_cache_update("fp16", D, capability))
    cases = []
    gen = torch.Generator(device="cuda").manual_seed(isa)
    for seq in SEQS:
        for past in PASTS:
            batch = len(past)

            def rand(*shape):
                return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float16)

            q, k, v = rand(batch, HQ, seq, D), rand(batch, HKV, seq, D), rand(batch, HKV, seq, D)
            k_cache, v_cache = rand(batch, HKV, C, D), rand(batch, HKV, C, D)
            past_len = torch.tensor(past, dtype=torch.int64, device="cuda")
            out = torch.full_like(q, float("nan"))
            run_attention(attention, q, k, v, k_cache, v_cache, past_len, out)
            expected = sliding_window_attention_reference(q, k, v, k_cache, v_cache, past_len, W, SCALE)
            torch.cuda.synchronize()
            cases.append(
                {
                    "kernel": "attention",
                    "isa": isa,
                    "S": seq,
                    "past": past,
                    "rel_err": rel_err(out, expected),
                    "bar": TOLERANCE,
                }
            )
            for aliased in (True, False):
                cache = k_cache.clone()
                expected_cache = rolling_cache_update_reference(cache, k, past_len)
                target = cache if aliased else torch.full_like(cache, float("nan"))
                run_cache_update(update, cache, k, past_len, out, target)
                torch.cuda.synchronize()
                exact = bool(torch.equal(target, expected_cache)) and (aliased or bool(torch.equal(cache, k_cache)))
                cases.append(
                    {
                        "kernel": "cache_update",
                        "isa": isa,
                        "S": seq,
                        "past": past,
                        "output": "aliased" if aliased else "separate",
                        "exact": exact,
                    }
                )
    for case in cases:
        case["passed"] = case["exact"] if "exact" in case else case["rel_err"] <= case["bar"]
    return cases


def cuda_time_ms(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def decode_timing(batch: int) -> dict:
    """AOT attention (the chunk kernel at S = 1) vs the JIT split decode, one call per layer over LAYERS layers."""
    os.environ.pop("MISTRAL_EXPORT_PTX_ISA", None)
    attention = Loaded(aot.compile_chunk_attention("fp16", D, GROUP, SCALE, aot.target_capability()))
    layers = []
    for _ in range(LAYERS):
        layers.append(
            [
                torch.randn(*shape, device="cuda", dtype=torch.float16)
                for shape in (
                    (batch, HQ, 1, D),
                    (batch, HKV, 1, D),
                    (batch, HKV, 1, D),
                    (batch, HKV, C, D),
                    (batch, HKV, C, D),
                )
            ]
        )
    past_len = torch.full((batch,), 3 * W + 17, dtype=torch.int64, device="cuda")  # a full window of keys
    outs = [torch.empty_like(layer[0]) for layer in layers]

    def aot_step():
        for layer, out in zip(layers, outs, strict=True):
            run_attention(attention, *layer, past_len, out)

    def jit_step():
        for layer, out in zip(layers, outs, strict=True):
            kernels.sliding_window_attention(*layer, past_len, W, SCALE, out=out)

    aot_ms, jit_ms = cuda_time_ms(aot_step) / LAYERS, cuda_time_ms(jit_step) / LAYERS
    return {
        "batch": batch,
        "keys": W,
        "aot_us_per_layer": round(aot_ms * 1e3, 2),
        "jit_split_decode_us_per_layer": round(jit_ms * 1e3, 2),
        "aot_over_jit": round(aot_ms / jit_ms, 2),
    }


def markdown(results: dict) -> str:
    lines = [
        "# AOT plugin kernels through the CUDA driver API (benchmarks/aot_driver_check.py)",
        "",
        provenance_markdown(results["provenance"]),
        f"Driver CUDA {results['driver_cuda']}; PTX ISA for this driver {results['isa_for_driver']}, "
        f"default without a driver {aot.DEFAULT_PTX_ISA}.",
        "",
    ]
    failed = [c for c in results["cases"] if not c["passed"]]
    lines += [
        f"Correctness: {len(results['cases']) - len(failed)}/{len(results['cases'])} cases pass "
        f"(attention max rel. error ≤ {TOLERANCE:g}; cache update exact, whole cache).",
        "",
    ]
    lines += ["| kernel | ISA | S | past_len | output | result |", "|---|---|---|---|---|---|"]
    for c in results["cases"]:
        value = f"{c['rel_err']:.2e}" if "rel_err" in c else ("exact" if c["exact"] else "DIFFERS")
        lines.append(
            f"| {c['kernel']} | {c['isa']} | {c['S']} | {c['past']} | {c.get('output', '')} | "
            f"{value} {'PASS' if c['passed'] else 'FAIL'} |"
        )
    if results.get("timing"):
        lines += [
            "",
            "Decode attention per layer (window of 4096 keys, fp16, CUDA events, median):",
            "",
            "| batch | AOT chunk kernel µs | JIT split decode µs | AOT / JIT |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {t['batch']} | {t['aot_us_per_layer']} | {t['jit_split_decode_us_per_layer']} | {t['aot_over_jit']} |"
            for t in results["timing"]
        ]
    if results.get("error"):
        lines += ["", f"Error: {results['error']}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    started = time.monotonic()
    torch.cuda.init()
    torch.empty(1, device="cuda")  # the primary context is current: modules load into it
    version = check(driver().cuDriverGetVersion())
    results = {
        "provenance": provenance(("torch", "triton", "cuda-python")),
        "driver_cuda": f"{version // 1000}.{version % 1000 // 10}",
        "isa_for_driver": aot.ptx_isa(aot.target_capability()),
        "cases": [],
        "timing": [],
    }
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    try:
        for isa in sorted({results["isa_for_driver"], aot.DEFAULT_PTX_ISA}):
            results["cases"] += correctness(isa)
        results["timing"] = [decode_timing(batch) for batch in (1, 8)]
    except Exception as exc:  # recorded in the results file, then a failing status
        results["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    tag = gpu_tag()
    (out / f"aot_driver_check_{tag}.json").write_text(json.dumps(results, indent=2))
    (out / f"aot_driver_check_{tag}.md").write_text(markdown(results))
    print(markdown(results))
    return 1 if results.get("error") or not all(c["passed"] for c in results["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
