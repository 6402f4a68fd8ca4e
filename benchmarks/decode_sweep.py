"""Decode attention (S = 1) variants on one GPU: where do the microseconds of a batch-1 step go?

Mistral 7B shapes (32 q heads / 8 kv heads, head_dim 128, fp16, window = capacity 4096, past_len 32000 so the
window is full and the ring wrapped). The library's launcher (`kernels.sliding_window_attention`) has one decode
configuration, the measured best; the variants here (keys per tile, waves of programs, warps, stages,
programmatic dependent launch) are launched by this script's own `launch_decode` on the library's kernels. For
each: correctness against `sliding_window_attention_reference` on random inputs (output pre-filled with NaN;
batch 1 at past 32000 and batch 3 at mixed past), then the time per layer of a CUDA graph over 32 layers with
separate caches (the caches, 537 MB, do not fit in L2), median of many replays after warm-up. Also timed in the
same graph structure: empty kernels (the fixed floor of one or two kernel nodes per layer), a plain streaming read
of the same K + V bytes (the ceiling at this size; once more with its addresses waiting on a loaded scalar, as the
decode kernel's wait on past_len), and the partial kernel alone (merge skipped) to show what the merge costs.
Bandwidth uses gpu_check's convention: bytes of K + V + q per layer over the time, as a fraction of a
device-to-device copy measured in this run (bytes read + written).

Measured and dropped (2026-11-27, H200, benchmarks/results/decode_sweep_h200.md): scores and values through fp32
broadcast products instead of tl.dot ("fma" rows there: 34.6 and 47.4 µs per layer, 255 registers and spills at
BN >= 32), so the kernel keeps tl.dot with the GQA group padded to 16 rows; merging the splits in the last split's
program (atomic ticket, "fused" rows: 12.8 vs 12.3 µs), so the merge stays a second kernel.

Needs only torch and triton. Run: PYTHONPATH=$PWD python3 benchmarks/decode_sweep.py
Writes decode_sweep_<gpu>.json and .md (git commit, command, versions, GPU) to $OUT if set, else
benchmarks/results/, after every variant, and stops starting variants after DECODE_SWEEP_BUDGET_S seconds
(default 240).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import triton
import triton.language as tl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu_check import copy_ms, cuda_time_ms, decode_bytes_read, fmt, out_dir, rand, rel_err

from mistral_export.model.ops import sliding_window_attention_reference
from mistral_export.plugins import kernels

from provenance import gpu_tag, provenance
from provenance import markdown as provenance_markdown

BUDGET_S = float(os.environ.get("DECODE_SWEEP_BUDGET_S", "240"))
START = time.monotonic()
HQ, HKV, D, W = 32, 8, 128, 4096
C = W
PAST = 32000
LAYERS = 32
SCALE = D**-0.5
TOL = 2e-3
TARGET_FRACTION = 0.70

results: dict = {
    "shape": {
        "q_heads": HQ,
        "kv_heads": HKV,
        "head_dim": D,
        "window": W,
        "capacity": C,
        "past_len": PAST,
        "layers": LAYERS,
        "dtype": "float16",
    },
    "floor": {},
    "variants": [],
    "batch16": [],
}


def time_left() -> float:
    return BUDGET_S - (time.monotonic() - START)


def save() -> None:
    results["elapsed_s"] = round(time.monotonic() - START, 1)
    (out_dir() / f"decode_sweep_{gpu_tag()}.json").write_text(json.dumps(results, indent=2))
    (out_dir() / f"decode_sweep_{gpu_tag()}.md").write_text(markdown())


def graph_ms(fn, warmup: int = 5, iters: int = 60) -> float:
    """Median CUDA-event time of one replay of a graph capturing `fn` (after an eager warm-up call)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    try:
        return cuda_time_ms(g.replay, warmup=warmup, iters=iters)
    finally:
        del g


@triton.jit
def empty_kernel(x_ptr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def stream_read_kernel(a_ptr, b_ptr, out_ptr, offset_ptr, CHUNK: tl.constexpr, DEPENDENT: tl.constexpr):
    """Sums a contiguous CHUNK of a and of b per program: the bytes of a decode step with no attention.

    One load per tensor and program, so every byte a program reads is in flight at once (a loop would wait for
    each block before the next: Triton does not pipeline loads that feed no dot). DEPENDENT: the addresses first
    wait for a scalar loaded from memory (0), as the decode kernel waits for past_len; the difference is what that
    dependent load costs."""
    base = tl.program_id(0).to(tl.int64) * CHUNK
    if DEPENDENT:
        base += tl.load(offset_ptr)
    offs = base + tl.arange(0, CHUNK)
    total = tl.sum(tl.load(a_ptr + offs).to(tl.float32), 0) + tl.sum(tl.load(b_ptr + offs).to(tl.float32), 0)
    tl.store(out_ptr + tl.program_id(0), total)


LIBRARY = "library"  # a variant that is the library's own launcher, kernels.sliding_window_attention


def launch_decode(
    q, k, v, kc, vc, pl, out, *, block_n: int, waves: float, warps: int, stages: int, pdl: int, merge: bool = True
) -> None:
    """The library's decode kernels under another launch configuration (the library's `_decode` with its constants
    as arguments). pdl: 0 off, 1 the merge kernel launched early (it waits for the partials in its prologue), 2 the
    partial kernel too (it waits for whatever precedes it before reading anything). merge=False skips the merge
    kernel (timing only: the output is then not written)."""
    batch, q_heads, _, head_dim = q.shape
    kv_heads, capacity = kc.shape[1], kc.shape[2]
    group = q_heads // kv_heads
    splits, per_split = kernels.decode_splits(
        kernels.decode_max_keys(W, capacity),
        batch * kv_heads,
        torch.cuda.get_device_properties(q.device).multi_processor_count,
        block_n,
        waves,
    )
    part_out = torch.empty((batch * q_heads * splits, head_dim), device=q.device, dtype=torch.float32)
    part_max = torch.empty((batch * q_heads * splits,), device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    kernels.decode_partial_kernel[(splits, kv_heads, batch)](
        q,
        k,
        v,
        kc,
        vc,
        pl,
        part_out,
        part_max,
        part_sum,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        kc.stride(0),
        kc.stride(1),
        kc.stride(2),
        capacity,
        W,
        SCALE * kernels.LOG2E,
        per_split,
        splits,
        GROUP=group,
        BLOCK_G=kernels.decode_block_g(group),
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        DOT_PRECISION=kernels.dot_precision(q.dtype),
        PDL=pdl > 0,
        num_warps=warps,
        num_stages=stages,
        **({"launch_pdl": True} if pdl >= 2 else {}),
    )
    if merge:
        kernels.decode_merge_kernel[(batch * q_heads,)](
            part_out,
            part_max,
            part_sum,
            out,
            out.stride(0),
            out.stride(1),
            splits,
            Q_HEADS=q_heads,
            BLOCK_SPLITS=triton.next_power_of_2(splits),
            HEAD_DIM=head_dim,
            PDL=pdl > 0,
            num_warps=4 if head_dim >= 64 else 1,
            **({"launch_pdl": True} if pdl else {}),
        )


def attention(q, k, v, kc, vc, pl, out, opts) -> None:
    if opts == LIBRARY:
        kernels.sliding_window_attention(q, k, v, kc, vc, pl, W, SCALE, out=out)
    else:
        launch_decode(q, k, v, kc, vc, pl, out, **opts)


class Inputs:
    def __init__(self, batch: int, past: int):
        self.batch = batch
        self.q = [rand(batch, HQ, 1, D) for _ in range(LAYERS)]
        self.k = [rand(batch, HKV, 1, D) for _ in range(LAYERS)]
        self.v = [rand(batch, HKV, 1, D) for _ in range(LAYERS)]
        self.kc = [rand(batch, HKV, C, D) for _ in range(LAYERS)]
        self.vc = [rand(batch, HKV, C, D) for _ in range(LAYERS)]
        self.pl = torch.full((batch,), past, device="cuda", dtype=torch.int64)
        self.outs = [torch.empty_like(x) for x in self.q]

    def run(self, opts) -> None:
        for i in range(LAYERS):
            attention(self.q[i], self.k[i], self.v[i], self.kc[i], self.vc[i], self.pl, self.outs[i], opts)

    def check_graph_outputs(self, opts) -> float:
        """Runs the layers once more (eagerly) into NaN-filled outputs and checks the first and last layer."""
        for o in self.outs:
            o.fill_(float("nan"))
        self.run(opts)
        return max(
            rel_err(
                self.outs[i],
                sliding_window_attention_reference(
                    self.q[i], self.k[i], self.v[i], self.kc[i], self.vc[i], self.pl, W, SCALE
                ),
            )
            for i in (0, LAYERS - 1)
        )


def correctness(opts) -> dict:
    """Fresh random inputs: batch 1 at past 32000 and batch 3 at mixed past (empty splits, short contexts)."""
    errs = {}
    for label, past in (("b1_past32000", [PAST]), ("b3_mixed_past", [5, 4095, 30001])):
        b = len(past)
        q, k, v = rand(b, HQ, 1, D), rand(b, HKV, 1, D), rand(b, HKV, 1, D)
        kc, vc = rand(b, HKV, C, D), rand(b, HKV, C, D)
        pl = torch.tensor(past, device="cuda", dtype=torch.int64)
        out = torch.full_like(q, float("nan"))
        attention(q, k, v, kc, vc, pl, out, opts)
        errs[label] = rel_err(out, sliding_window_attention_reference(q, k, v, kc, vc, pl, W, SCALE))
    return errs


def ok(errs: dict) -> bool:
    return all(not math.isnan(e) and e <= TOL for e in errs.values())


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    torch.manual_seed(0)
    results["provenance"] = provenance(("torch", "triton"), env=("DECODE_SWEEP_BUDGET_S",))
    results["device"] = {
        "name": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "pdl_available": kernels._PDL_AVAILABLE,
    }
    print("GPU:", results["device"], flush=True)

    # Copy bandwidth (1 GiB, bytes read + written), as in gpu_check.
    n = 1 << 30
    copy_gbps = 2 * n / copy_ms(n) / 1e6
    results["copy_gbps_read_plus_write"] = copy_gbps
    torch.cuda.empty_cache()
    print(f"copy: {copy_gbps:.0f} GB/s", flush=True)
    save()

    bytes_b1 = decode_bytes_read(1, HKV, HQ, W, D, 2)
    results["bytes_per_layer_b1"] = bytes_b1

    # Fixed floor: empty kernels in the same graph structure (32 layers; grids of the default decode launch).
    x = torch.empty(1, device="cuda")
    floors = {
        "empty single kernel (grid 256)": lambda: [empty_kernel[(256,)](x, PDL=False) for _ in range(LAYERS)],
        "empty kernel pair (grids 256 + 32)": lambda: [
            (empty_kernel[(256,)](x, PDL=False), empty_kernel[(32,)](x, PDL=False)) for _ in range(LAYERS)
        ],
    }
    if kernels._PDL_AVAILABLE:
        floors["empty kernel pair, second with PDL"] = lambda: [
            (empty_kernel[(256,)](x, PDL=True), empty_kernel[(32,)](x, PDL=True, launch_pdl=True))
            for _ in range(LAYERS)
        ]
        floors["empty kernel pair, both with PDL"] = lambda: [
            (empty_kernel[(256,)](x, PDL=True, launch_pdl=True), empty_kernel[(32,)](x, PDL=True, launch_pdl=True))
            for _ in range(LAYERS)
        ]
    for label, fn in floors.items():
        try:
            results["floor"][label] = graph_ms(fn) / LAYERS * 1e3  # µs per layer
        except Exception as exc:
            results["floor"][label] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"[floor] {label}: {results['floor'][label]}", flush=True)
    save()

    b1 = Inputs(1, PAST)

    # Size-matched ceiling: a plain streaming read of the same K + V bytes per layer (no attention), same graph.
    zero = torch.zeros(1, device="cuda", dtype=torch.int64)
    for chunk, warps, dependent in ((4096, 4, False), (16384, 8, False), (2048, 4, False), (4096, 4, True)):
        n = b1.kc[0].numel()
        progs = n // chunk
        label = f"streaming read of the layer's K+V caches, {progs} programs x {chunk} elements"
        if dependent:
            label += ", addresses after a dependent scalar load"
        try:
            sink = torch.empty(progs, device="cuda", dtype=torch.float32)

            def read_all():
                for i in range(LAYERS):
                    stream_read_kernel[(progs,)](
                        b1.kc[i], b1.vc[i], sink, zero, CHUNK=chunk, DEPENDENT=dependent, num_warps=warps
                    )

            ms = graph_ms(read_all)
            expected = b1.kc[0].float().sum() + b1.vc[0].float().sum()
            stream_read_kernel[(progs,)](
                b1.kc[0], b1.vc[0], sink, zero, CHUNK=chunk, DEPENDENT=dependent, num_warps=warps
            )
            results["floor"][label] = ms / LAYERS * 1e3
            results["floor"][label + ": fraction of copy"] = 2 * n * 2 / (ms / LAYERS) / 1e6 / copy_gbps
            results["floor"][label + ": sum matches"] = bool(torch.allclose(sink.sum(), expected, rtol=1e-3, atol=1.0))
        except Exception as exc:
            results["floor"][label] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"[floor] {label}: {results['floor'][label]}", flush=True)
    save()

    def run_variant(label: str, opts, partial_only: bool = False) -> dict | None:
        if time_left() < 45:
            print(f"[skip] {label}: out of budget", flush=True)
            return None
        row = {"label": label, "opts": opts, "partial_only": partial_only}
        t0 = time.monotonic()
        try:
            if partial_only:
                ms = graph_ms(lambda: b1.run({**opts, "merge": False}))
            else:
                row["rel_err"] = correctness(opts)
                ms = graph_ms(lambda: b1.run(opts))
            row["us_per_layer"] = ms / LAYERS * 1e3
            row["gbps"] = bytes_b1 / (ms / LAYERS) / 1e6
            row["fraction_of_copy"] = row["gbps"] / copy_gbps
            if not partial_only:
                row["graph_outputs_rel_err"] = b1.check_graph_outputs(opts)
                row["ok"] = ok(row["rel_err"]) and row["graph_outputs_rel_err"] <= TOL
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            row["traceback"] = traceback.format_exc()[-1500:]
        row["s"] = round(time.monotonic() - t0, 1)
        results["variants"].append(row)
        print(
            f"[b1] {label}: {row.get('us_per_layer', row.get('error'))} us/layer "
            f"frac={row.get('fraction_of_copy')} ok={row.get('ok')} err={row.get('rel_err')} ({row['s']}s)",
            flush=True,
        )
        save()
        return row

    def cfg(block_n=64, waves=2.0, warps=4, stages=3, pdl=0):
        return dict(block_n=block_n, waves=waves, warps=warps, stages=stages, pdl=pdl)

    def name(o):
        if o == LIBRARY:
            return (
                f"library launcher (BN{kernels.DECODE_BLOCK_N} waves{kernels.DECODE_WAVES:g} "
                f"w{kernels.DECODE_NUM_WARPS} s{kernels.DECODE_NUM_STAGES}, PDL on sm_90+)"
            )
        return f"BN{o['block_n']} waves{o['waves']:g} w{o['warps']} s{o['stages']}" + (
            f" pdl{o['pdl']}" if o["pdl"] else ""
        )

    base = cfg()  # the default before the first sweep (2026-11-27: BN64 waves2 w4 s3, no PDL)
    run_variant("former default " + name(base), base)
    run_variant(name(LIBRARY), LIBRARY)
    run_variant("partial kernel alone (merge skipped) " + name(base), base, partial_only=True)
    # Programmatic dependent launch on the former default's tiles.
    for o in (cfg(pdl=1), cfg(pdl=2)):
        run_variant(name(o), o)
    # Tiles / splits / warps / stages (no PDL).
    tile_cfgs = [
        cfg(waves=4),
        cfg(waves=1),
        cfg(block_n=32, waves=4),
        cfg(block_n=32, waves=2),
        cfg(block_n=128, warps=8),
        cfg(block_n=128, waves=1, warps=8),
        cfg(warps=8),
        cfg(stages=2),
        cfg(stages=4),
        cfg(waves=1, stages=4),
        cfg(block_n=32, waves=8),
    ]
    tile_rows = [r for r in (run_variant(name(o), o) for o in tile_cfgs) if r is not None]
    # The best tiles with PDL.
    for r in sorted([r for r in tile_rows if r.get("ok")], key=lambda r: r["us_per_layer"])[:2]:
        for pdl in (1, 2):
            o = {**r["opts"], "pdl": pdl}
            run_variant(name(o), o)
    run_variant("former default again (spread) " + name(base), base)
    partial_best = sorted([r for r in results["variants"] if r.get("ok")], key=lambda r: r["us_per_layer"])
    best = next((r["opts"] for r in partial_best if r["opts"] != LIBRARY), None)
    if best is not None and best != base:
        run_variant("partial kernel alone (merge skipped) " + name(best), best, partial_only=True)

    # Batch 16 (auto splits under each variant's waves): the default and the best batch-1 variants.
    del b1
    torch.cuda.empty_cache()
    if time_left() < 25:
        save()
        return
    b16 = Inputs(16, PAST)
    bytes_b16 = decode_bytes_read(16, HKV, HQ, W, D, 2)
    cands = [base, LIBRARY]
    for r in partial_best:
        if r["opts"] not in cands and len(cands) < 5:
            cands.append(r["opts"])
    for o in cands:
        if time_left() < 10:
            break
        row = {"label": name(o), "opts": o}
        try:
            ms = graph_ms(lambda: b16.run(o), iters=30)
            row["us_per_layer"] = ms / LAYERS * 1e3
            row["gbps"] = bytes_b16 / (ms / LAYERS) / 1e6
            row["fraction_of_copy"] = row["gbps"] / copy_gbps
            row["graph_outputs_rel_err"] = b16.check_graph_outputs(o)
            row["ok"] = row["graph_outputs_rel_err"] <= TOL
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        results["batch16"].append(row)
        print(
            f"[b16] {row['label']}: {row.get('us_per_layer', row.get('error'))} us/layer "
            f"frac={row.get('fraction_of_copy')} ok={row.get('ok')}",
            flush=True,
        )
        save()


def markdown() -> str:
    d = results.get("device", {})
    lines = [
        f"# Decode attention sweep: {d.get('name', '?')}",
        "",
        provenance_markdown(results["provenance"]) if "provenance" in results else "",
        f"capability {d.get('capability')}, {d.get('sms')} SMs; {results.get('elapsed_s', '?')} s. Shapes: 32 q / 8 kv heads, head_dim "
        f"128, fp16, window = capacity 4096, past_len 32000. Time per layer of a CUDA graph over 32 layers with "
        f"separate caches (median of 60 replays).",
        "",
    ]
    if "copy_gbps_read_plus_write" in results:
        copy = results["copy_gbps_read_plus_write"]
        lines += [
            f"Device-to-device copy: {copy:.0f} GB/s (read + written). Batch 1 moves "
            f"{results.get('bytes_per_layer_b1', 0) / 1e6:.1f} MB per layer: the 70% target is "
            f"{results.get('bytes_per_layer_b1', 0) / (TARGET_FRACTION * copy * 1e3):.2f} µs per layer.",
            "",
        ]
    if results["floor"]:
        lines += [
            "## Floor and ceiling: empty kernels, and a plain read of the same bytes, same graph structure",
            "",
            "| graph per layer | µs per layer (or as named) |",
            "| --- | --- |",
        ]
        lines += [f"| {k} | {fmt(v)} |" for k, v in results["floor"].items()]
        lines.append("")
    if results["variants"]:
        lines += [
            "## Batch 1",
            "",
            "Variants: BN keys per tile; waves = target programs / SMs (sets keys per split); w warps; s stages; "
            "pdl1 = merge kernel launched with programmatic dependent launch, pdl2 = both kernels.",
            "",
            "| variant | µs / layer | GB/s | of copy | rel err (b1, b3 mixed, graph) | ok |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in results["variants"]:
            if "error" in r:
                lines.append(f"| {r['label']} | error: {r['error'][:150]} | | | | |")
                continue
            errs = r.get("rel_err", {})
            e = ", ".join(fmt(v) for v in errs.values())
            if "graph_outputs_rel_err" in r:
                e += f", {fmt(r['graph_outputs_rel_err'])}"
            lines.append(
                f"| {r['label']} | {fmt(r['us_per_layer'])} | {fmt(r['gbps'], 4)} | "
                f"{fmt(r['fraction_of_copy'])} | {e if e else 'n/a (partial only)'} | {r.get('ok', '-')} |"
            )
        lines.append("")
    if results["batch16"]:
        lines += [
            "## Batch 16 (auto splits)",
            "",
            "| variant | µs / layer | GB/s | of copy | rel err (graph) | ok |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in results["batch16"]:
            if "error" in r:
                lines.append(f"| {r['label']} | error: {r['error'][:150]} | | | | |")
                continue
            lines.append(
                f"| {r['label']} | {fmt(r['us_per_layer'])} | {fmt(r['gbps'], 4)} | "
                f"{fmt(r['fraction_of_copy'])} | {fmt(r['graph_outputs_rel_err'])} | {r['ok']} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("decode_sweep needs a CUDA GPU")
    try:
        main()
    finally:
        save()
        print(markdown(), flush=True)
