"""One prepared GPU check of the Triton kernels (run by benchmarks/gpu_check.sh; needs only torch and triton).

1. Correctness against the torch reference at Mistral 7B shapes (32 query / 8 KV heads, head_dim 128,
   window 4096, contexts up to 32k, batch 1 and 16), random inputs, outputs pre-filled with NaN.
2. Timings with CUDA events (median after warm-up): decode attention vs torch SDPA with an explicit window mask,
   and decode's achieved memory bandwidth against a measured device-to-device copy; decode is also timed as a
   CUDA graph over 32 layers with distinct caches (as in the model; a single layer's 17 MB would sit in L2).
3. Prefill at 16k and 32k tokens, window 4096, vs SDPA with a dense window mask.
4. The torch.ops path (`mistral_export.plugins.torch_cuda`) once on CUDA.

Writes gpu_check_<gpu>.json and .md to $OUT if set, else benchmarks/results/, after every section (each file
records the git commit, command, versions and GPU), and stops starting new sections after a time budget so that
it ends within a few minutes. Every section draws its random inputs from a generator seeded with its name.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import traceback
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mistral_export.model.ops import (
    rolling_cache_update_reference,
    sliding_window_attention_reference,
)
from mistral_export.plugins import kernels

from provenance import RESULTS, gpu_tag, provenance
from provenance import markdown as provenance_markdown

BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "270"))
START = time.monotonic()
HQ, HKV, D, W = 32, 8, 128, 4096
C = W
SCALE = D**-0.5
TARGETS = {
    "decode_bw_fraction_batch1": 0.70,
    "prefill_16k_speedup_vs_sdpa": 2.0,
    "prefill_32k_over_16k": 2.3,
}

results: dict = {"targets": TARGETS, "sections": {}}


def out_dir() -> Path:
    d = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    d.mkdir(parents=True, exist_ok=True)
    return d


def time_left() -> float:
    return BUDGET_S - (time.monotonic() - START)


def save() -> None:
    results["elapsed_s"] = round(time.monotonic() - START, 1)
    tag = gpu_tag()
    (out_dir() / f"gpu_check_{tag}.json").write_text(json.dumps(results, indent=2))
    (out_dir() / f"gpu_check_{tag}.md").write_text(markdown())


def section(name: str, min_left: float):
    """Decorator: runs a section if enough budget is left, records its result or error, saves."""

    def wrap(fn):
        if time_left() < min_left:
            results["sections"][name] = {"skipped": f"time budget ({time_left():.0f}s left < {min_left}s)"}
            print(f"[{name}] skipped: out of time budget", flush=True)
            save()
            return fn
        t0 = time.monotonic()
        torch.manual_seed(zlib.crc32(name.encode()))  # same inputs whatever ran before
        try:
            value = fn()
            results["sections"][name] = value
        except Exception as exc:  # record and go on to the next section
            results["sections"][name] = {
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-3000:],
            }
        results["sections"][name] = {**results["sections"][name], "section_s": round(time.monotonic() - t0, 1)}
        print(f"[{name}] {json.dumps(results['sections'][name])[:1500]}", flush=True)
        torch.cuda.empty_cache()
        save()
        return fn

    return wrap


def cuda_time_ms(fn, warmup: int = 5, iters: int = 50, max_s: float = 10.0) -> float:
    """Median of per-call CUDA-event times after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    t_end = time.monotonic() + max_s
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if time.monotonic() > t_end:
            break
    return statistics.median(times)


def copy_ms(n: int) -> float:
    """Median time of a device-to-device copy of `n` bytes (the bandwidth reference of both GPU scripts)."""
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    return cuda_time_ms(lambda: dst.copy_(src), warmup=3, iters=20)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if torch.isnan(out).any():
        return float("nan")
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def rand(*shape, dtype=torch.float16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def decode_bytes_read(batch: int, kv_heads: int, q_heads: int, keys: int, head_dim: int, itemsize: int) -> int:
    """Bytes a decode step must read at least: K and V of every attended key, plus q (for bandwidth figures)."""
    return (2 * batch * kv_heads * keys + batch * q_heads) * head_dim * itemsize


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Bool mask [..., Sq, Sk]: key allowed iff 0 <= j <= p and j > p - W (the contract's rule)."""
    kp, qp = k_pos.unsqueeze(-2), q_pos.unsqueeze(-1)
    return (kp >= 0) & (kp <= qp) & (kp > qp - window)


# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    results["provenance"] = provenance(("torch", "triton"), env=("GPU_CHECK_BUDGET_S",))
    results["device"] = {
        "name": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
    }
    print("GPU:", results["device"], flush=True)
    save()

    @section("correctness", min_left=60)
    def correctness():
        rows = []
        cases = [
            # (label, batch, S, past_lens, dtype)
            ("decode b1 past 100", 1, 1, [100], torch.float16),
            ("decode b1 past 4095", 1, 1, [4095], torch.float16),
            ("decode b1 past 32000 (wrapped)", 1, 1, [32000], torch.float16),
            (
                "decode b16 mixed past up to 32k",
                16,
                1,
                [0, 1, 17, 4095, 4096, 4097, 5000, 8191, 9000, 12345, 16000, 20000, 24576, 30000, 32000, 32767],
                torch.float16,
            ),
            ("decode b16 bf16", 16, 1, [i * 2000 + 7 for i in range(16)], torch.bfloat16),
            ("decode b1 fp32", 1, 1, [9000], torch.float32),
            ("chunk 512 at past 30000 (wrap)", 1, 512, [30000], torch.float16),
            ("chunk 512 b4 mixed past", 4, 512, [0, 100, 4000, 31000], torch.bfloat16),
            ("prefill 6000 > window", 1, 6000, [0], torch.float16),
            ("chunk 5000 at past 2000", 1, 5000, [2000], torch.float16),
        ]
        for label, b, s, past, dtype in cases:
            q, k, v = rand(b, HQ, s, D, dtype=dtype), rand(b, HKV, s, D, dtype=dtype), rand(b, HKV, s, D, dtype=dtype)
            kc, vc = rand(b, HKV, C, D, dtype=dtype), rand(b, HKV, C, D, dtype=dtype)
            pl = torch.tensor(past, device="cuda", dtype=torch.int64)
            out = torch.full_like(q, float("nan"))
            kernels.sliding_window_attention(q, k, v, kc, vc, pl, W, SCALE, out=out)
            ref = sliding_window_attention_reference(q, k, v, kc, vc, pl, W, SCALE)
            err = rel_err(out, ref)
            tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
            rows.append(
                {"case": label, "dtype": str(dtype).split(".")[-1], "rel_err": err, "tol": tol, "ok": err <= tol}
            )
            new_kc = kc.clone()
            kernels.rolling_cache_update_(new_kc, k, pl)
            exact = torch.equal(new_kc, rolling_cache_update_reference(kc, k, pl))
            rows.append({"case": f"cache update: {label}", "exact": exact, "ok": exact})
            del q, k, v, kc, vc, out, ref, new_kc
        return {"cases": rows, "all_ok": all(r["ok"] for r in rows)}

    @section("copy_bandwidth", min_left=30)
    def copy_bandwidth():
        n = 1 << 30
        ms = copy_ms(n)
        return {"bytes": n, "ms": ms, "gbps_read_plus_write": 2 * n / ms / 1e6}

    def decode_inputs(b, layers, past):
        q = [rand(b, HQ, 1, D) for _ in range(layers)]
        k = [rand(b, HKV, 1, D) for _ in range(layers)]
        v = [rand(b, HKV, 1, D) for _ in range(layers)]
        kc = [rand(b, HKV, C, D) for _ in range(layers)]
        vc = [rand(b, HKV, C, D) for _ in range(layers)]
        pl = torch.full((b,), past, device="cuda", dtype=torch.int64)
        return q, k, v, kc, vc, pl

    @section("decode", min_left=60)
    def decode():
        copy_gbps = results["sections"].get("copy_bandwidth", {}).get("gbps_read_plus_write")
        rows = []
        layers = 32
        for b in (1, 16):
            q, k, v, kc, vc, pl = decode_inputs(b, layers, past=32000)  # window full, ring wrapped
            bytes_layer = decode_bytes_read(b, HKV, HQ, W, D, 2)
            single = cuda_time_ms(
                lambda: kernels.sliding_window_attention(q[0], k[0], v[0], kc[0], vc[0], pl, W, SCALE), iters=100
            )
            outs = [torch.empty_like(x) for x in q]

            def all_layers(kps=None):
                for i in range(layers):
                    kernels.sliding_window_attention(
                        q[i], k[i], v[i], kc[i], vc[i], pl, W, SCALE, out=outs[i], keys_per_split=kps
                    )

            graph_ms = {}
            for kps in (None, 64, 128, 256, 512):  # None: the launcher's own split count
                all_layers(kps)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    all_layers(kps)
                graph_ms[str(kps or "auto")] = cuda_time_ms(g.replay, warmup=3, iters=30) / layers
            per_layer = graph_ms["auto"]
            check = [
                rel_err(outs[i], sliding_window_attention_reference(q[i], k[i], v[i], kc[i], vc[i], pl, W, SCALE))
                for i in (0, layers - 1)
            ]
            gbps = bytes_layer / per_layer / 1e6

            # SDPA baseline: keys = [cache ∪ new] with an explicit window mask, K/V expanded to the q heads.
            keys = torch.cat([kc[0], k[0]], dim=2).repeat_interleave(HQ // HKV, dim=1)
            vals = torch.cat([vc[0], v[0]], dim=2).repeat_interleave(HQ // HKV, dim=1)
            slots = torch.arange(C, device="cuda")
            last = pl.unsqueeze(1) - 1
            cache_pos = last - torch.remainder(last - slots, C)
            key_pos = torch.cat([cache_pos, pl.unsqueeze(1)], dim=1)  # [B, C+1]
            mask = window_mask(pl.view(b, 1), key_pos, W).view(b, 1, 1, C + 1)
            sdpa = cuda_time_ms(
                lambda: F.scaled_dot_product_attention(q[0], keys, vals, attn_mask=mask, scale=SCALE), iters=100
            )
            ref_out = F.scaled_dot_product_attention(q[0], keys, vals, attn_mask=mask, scale=SCALE)
            tri_out = kernels.sliding_window_attention(q[0], k[0], v[0], kc[0], vc[0], pl, W, SCALE)
            rows.append(
                {
                    "batch": b,
                    "window": W,
                    "past_len": 32000,
                    "triton_single_call_ms": single,
                    "triton_per_layer_in_32_layer_graph_ms": per_layer,
                    "graph_per_layer_ms_by_keys_per_split": graph_ms,
                    "sdpa_single_call_ms": sdpa,
                    "bytes_per_layer": bytes_layer,
                    "achieved_gbps": gbps,
                    "best_achieved_gbps": bytes_layer / min(graph_ms.values()) / 1e6,
                    "fraction_of_copy_bw": gbps / copy_gbps if copy_gbps else None,
                    "rel_err_vs_sdpa": rel_err(tri_out, ref_out),
                    "graph_outputs_rel_err_vs_reference": check,
                }
            )
            del q, k, v, kc, vc, outs, keys, vals
            torch.cuda.empty_cache()
        return {"rows": rows}

    def prefill_case(s):
        q, k, v = rand(1, HQ, s, D), rand(1, HKV, s, D), rand(1, HKV, s, D)
        kc, vc = (
            torch.zeros(1, HKV, C, D, device="cuda", dtype=torch.float16),
            torch.zeros(1, HKV, C, D, device="cuda", dtype=torch.float16),
        )
        pl = torch.zeros(1, device="cuda", dtype=torch.int64)
        out = torch.empty_like(q)
        tri = cuda_time_ms(
            lambda: kernels.sliding_window_attention(q, k, v, kc, vc, pl, W, SCALE, out=out), warmup=2, iters=10
        )
        pos = torch.arange(s, device="cuda")
        mask = window_mask(pos, pos, W)  # dense [S, S]
        keys, vals = k.repeat_interleave(HQ // HKV, dim=1), v.repeat_interleave(HQ // HKV, dim=1)
        row = {"tokens": s, "window": W, "triton_ms": tri}
        flops = 4 * HQ * D * sum(min(i + 1, W) for i in range(s))
        row["triton_tflops"] = flops / tri / 1e9
        try:
            sd = cuda_time_ms(
                lambda: F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=SCALE),
                warmup=1,
                iters=5,
                max_s=20,
            )
            ref = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=SCALE)
            row.update({"sdpa_dense_mask_ms": sd, "speedup_vs_sdpa": sd / tri, "rel_err_vs_sdpa": rel_err(out, ref)})
        except torch.OutOfMemoryError as exc:
            row["sdpa_dense_mask_ms"] = f"OOM: {exc}"[:200]
        return row

    @section("prefill", min_left=45)
    def prefill():
        rows = [prefill_case(16384)]
        save()
        if time_left() > 25:
            rows.append(prefill_case(32768))
        out = {"rows": rows}
        if len(rows) == 2:
            out["ratio_32k_over_16k"] = rows[1]["triton_ms"] / rows[0]["triton_ms"]
        return out

    @section("torch_ops", min_left=15)
    def torch_ops():
        import mistral_export.plugins.torch_cuda  # noqa: F401

        b, s = 2, 33
        q, k, v = rand(b, HQ, s, D), rand(b, HKV, s, D), rand(b, HKV, s, D)
        kc, vc = rand(b, HKV, C, D), rand(b, HKV, C, D)
        pl = torch.tensor([5000, 17], device="cuda")
        out = torch.ops.mistral.sliding_window_attention(q, k, v, kc, vc, pl, W, SCALE)
        ref = sliding_window_attention_reference(q, k, v, kc, vc, pl, W, SCALE)
        expected_cache = rolling_cache_update_reference(kc, k, pl)
        torch.ops.mistral.rolling_cache_update_(kc, k, pl)
        return {"attention_rel_err": rel_err(out, ref), "cache_update_exact": torch.equal(kc, expected_cache)}

    results["verdict"] = verdict()
    save()
    print(markdown(), flush=True)


def verdict() -> dict:
    s = results["sections"]
    v = {}
    dec = s.get("decode", {}).get("rows", [])
    b1 = [r for r in dec if r["batch"] == 1]
    if b1 and b1[0].get("fraction_of_copy_bw") is not None:
        v["decode_bw_fraction_batch1"] = {
            "value": b1[0]["fraction_of_copy_bw"],
            "pass": b1[0]["fraction_of_copy_bw"] >= TARGETS["decode_bw_fraction_batch1"],
        }
    pre = s.get("prefill", {})
    rows = pre.get("rows", [])
    if rows and isinstance(rows[0].get("speedup_vs_sdpa"), float):
        v["prefill_16k_speedup_vs_sdpa"] = {
            "value": rows[0]["speedup_vs_sdpa"],
            "pass": rows[0]["speedup_vs_sdpa"] >= TARGETS["prefill_16k_speedup_vs_sdpa"],
        }
    if "ratio_32k_over_16k" in pre:
        v["prefill_32k_over_16k"] = {
            "value": pre["ratio_32k_over_16k"],
            "pass": pre["ratio_32k_over_16k"] <= TARGETS["prefill_32k_over_16k"],
        }
    if "correctness" in s and "all_ok" in s["correctness"]:
        v["correctness"] = {"pass": s["correctness"]["all_ok"]}
    if "torch_ops" in s and "attention_rel_err" in s["torch_ops"]:
        t = s["torch_ops"]
        v["torch_ops"] = {"pass": t["attention_rel_err"] <= 2e-3 and t["cache_update_exact"]}
    return v


def fmt(x, digits=3):
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}g}"
    return str(x)


def markdown() -> str:
    d = results.get("device", {})
    s = results["sections"]
    lines = [
        f"# GPU check: {d.get('name', '?')}",
        "",
        provenance_markdown(results["provenance"]) if "provenance" in results else "",
        f"capability {d.get('capability')}, {d.get('sms')} SMs, {d.get('memory_gib')} GiB; "
        f"{results.get('elapsed_s', '?')} s",
        "",
    ]
    if "correctness" in s:
        lines += [
            "## Correctness vs torch reference (Hq 32, Hkv 8, D 128, W = C = 4096; output pre-filled with NaN)",
            "",
            "| case | dtype | rel err | tol | ok |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in s["correctness"].get("cases", []):
            lines.append(
                f"| {r['case']} | {r.get('dtype', '')} | {fmt(r.get('rel_err', r.get('exact')))} | "
                f"{fmt(r.get('tol', 'exact'))} | {r['ok']} |"
            )
        if "error" in s["correctness"]:
            lines.append(f"\nerror: {s['correctness']['error']}")
        lines.append("")
    if "copy_bandwidth" in s and "gbps_read_plus_write" in s["copy_bandwidth"]:
        lines += [
            f"Device-to-device copy (1 GiB): {fmt(s['copy_bandwidth']['gbps_read_plus_write'], 4)} GB/s "
            "(bytes read + written).",
            "",
        ]
    if "decode" in s:
        lines += [
            "## Decode attention (window 4096 full, past_len 32000)",
            "",
            "| batch | triton 1 call ms | triton per layer (32-layer graph) ms | SDPA+mask 1 call ms | "
            "GB/s | of copy BW | best GB/s (keys/split sweep) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in s["decode"].get("rows", []):
            lines.append(
                f"| {r['batch']} | {fmt(r['triton_single_call_ms'])} | "
                f"{fmt(r['triton_per_layer_in_32_layer_graph_ms'])} | {fmt(r['sdpa_single_call_ms'])} | "
                f"{fmt(r['achieved_gbps'], 4)} | {fmt(r['fraction_of_copy_bw'])} | "
                f"{fmt(r['best_achieved_gbps'], 4)} |"
            )
        if "error" in s["decode"]:
            lines.append(f"\nerror: {s['decode']['error']}")
        lines.append("")
    if "prefill" in s:
        lines += [
            "## Prefill (window 4096, fp16, batch 1)",
            "",
            "| tokens | triton ms | TFLOP/s | SDPA dense mask ms | speedup | rel err vs SDPA |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in s["prefill"].get("rows", []):
            lines.append(
                f"| {r['tokens']} | {fmt(r['triton_ms'])} | {fmt(r['triton_tflops'])} | "
                f"{fmt(r.get('sdpa_dense_mask_ms'))} | {fmt(r.get('speedup_vs_sdpa'))} | "
                f"{fmt(r.get('rel_err_vs_sdpa'))} |"
            )
        if "ratio_32k_over_16k" in s["prefill"]:
            lines.append(f"\n32k / 16k time: {fmt(s['prefill']['ratio_32k_over_16k'])}")
        if "error" in s["prefill"]:
            lines.append(f"\nerror: {s['prefill']['error']}")
        lines.append("")
    if "torch_ops" in s:
        lines += ["## torch.ops on CUDA", "", f"`{json.dumps(s['torch_ops'])[:400]}`", ""]
    if "verdict" in results:
        lines += ["## Targets", "", "| target | value | threshold | pass |", "| --- | --- | --- | --- |"]
        for name, r in results["verdict"].items():
            lines.append(f"| {name} | {fmt(r.get('value', ''))} | {TARGETS.get(name, '')} | {r['pass']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU")
    main()
