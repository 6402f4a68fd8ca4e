"""Decode-step latency on CPU: eager torch vs the fp32 ONNX Runtime artifact, against the bandwidth floor.

For each model (the tiny fixture, if trained, and a synthetic ~170M config) and each context
W/2, W, 4W, 16W: the cache is filled with random values and past_len set to the context directly
(per-step cost depends only on the cache capacity C, not on what the cache holds), then decode
steps (S=1, batch 1) are timed, eager and ONNX Runtime in the same process on the same threads.

The floor is the bytes a decode step must read (all weights except the embedding table, of which
one row is read, plus the K/V cache) divided by this machine's memory bandwidth, measured here
with a large numpy copy before and between the timing rounds (the best figure is used, as the
fastest step is).

    python benchmarks/decode_cpu.py [--threads 2] [--steps 20] [--models tiny,synthetic-170m]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mistral_export.engines.onnxruntime_runner import OnnxRuntimeRunner  # noqa: E402
from mistral_export.engines.runner import EagerRunner  # noqa: E402
from mistral_export.engines.onnxruntime_artifact import write_onnxruntime_artifact  # noqa: E402
from mistral_export.export.onnx_export import export_onnx  # noqa: E402
from mistral_export.model.checkpoint import load_model, random_model  # noqa: E402
from mistral_export.model.config import TINY_DIR, ModelConfig  # noqa: E402

SYNTHETIC_170M = ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_layers=8, num_heads=16,
                             num_kv_heads=4, head_dim=64, sliding_window=256, name="synthetic-170m")


@functools.cache
def _copy_buffers(size_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    # Allocated (and faulted in) once: a fresh 2 GiB per measurement would time page faults and
    # disturb the decode steps measured after it.
    src = np.ones(size_bytes // 8, dtype=np.float64)
    return src, np.ones_like(src)


def memory_bandwidth(size_bytes: int = 1 << 30, repeats: int = 3) -> float:
    """Bytes/s of a large numpy copy (counts read + write), best of `repeats`."""
    src, dst = _copy_buffers(size_bytes)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def read_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a read-only stream (float32 dot with a vector of ones), best of `repeats`."""
    a = np.ones(size_bytes // 4, dtype=np.float32).reshape(-1, 4096)
    ones = np.ones(4096, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ ones
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def step_bytes(config: ModelConfig, bytes_per_element: int = 4) -> tuple[int, int]:
    """(weight bytes read per decode step, cache bytes read per step)."""
    weights = config.parameter_count() - config.vocab_size * config.hidden_size + config.hidden_size
    cache = config.kv_cache_bytes(config.cache_capacity, bytes_per_element)
    return weights * bytes_per_element, cache


def time_steps(runner, past: int, steps: int, warmup: int) -> list[float]:
    token = torch.tensor([[7]])
    times = []
    for i in range(warmup + steps):
        position = torch.tensor([past + i])
        t = time.perf_counter()
        runner.step(token, position)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def random_cache(config: ModelConfig, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    g = np.random.default_rng(seed)
    shape = (1, config.num_kv_heads, config.cache_capacity, config.head_dim)
    return [(g.standard_normal(shape, dtype=np.float32), g.standard_normal(shape, dtype=np.float32))
            for _ in range(config.num_layers)]


def bench_model(name: str, model, threads: int, steps: int, warmup: int, work: Path) -> dict:
    config = model.config
    t = time.perf_counter()
    path = export_onnx(model, work / name)
    write_onnxruntime_artifact(path)
    export_seconds = time.perf_counter() - t
    eager = EagerRunner(model)
    eager.reset(1)
    onnx_runner = OnnxRuntimeRunner(path, threads=threads)
    onnx_runner.reset(1)
    weights, cache = step_bytes(config)
    bandwidths = [memory_bandwidth()]
    window = config.sliding_window
    contexts = (("W/2", window // 2), ("W", window), ("4W", 4 * window), ("16W", 16 * window))
    caches = {label: random_cache(config, context) for label, context in contexts}
    eager_times = {label: [] for label, _ in contexts}
    onnx_times = {label: [] for label, _ in contexts}
    # Contexts interleaved over rounds, so a burst of load from elsewhere on the machine, or a slow phase
    # of the process, does not fall on one context alone.
    rounds = 8
    # At least ~50 ms of ONNX Runtime steps per context and round: a small model's step is short enough
    # for the machine's noise to hide its true cost in a few dozen samples.
    per_round = max(1, steps // rounds, int(0.05 * max(bandwidths) / (weights + cache)))
    for _ in range(rounds):
        for label, context in contexts:
            for i, (k, v) in enumerate(caches[label]):
                eager.cache[i][0].copy_(torch.from_numpy(k))
                eager.cache[i][1].copy_(torch.from_numpy(v))
            onnx_runner.fill_cache(caches[label])
            eager_times[label] += time_steps(eager, context, per_round, warmup)
            onnx_times[label] += time_steps(onnx_runner, context, per_round, warmup)
        # Bandwidth is measured before and between this model's rounds, and the best figure kept: the floor
        # comes from the machine's best moment in the same period as the steps (whose minimum is used).
        bandwidths.append(memory_bandwidth())
    floor = (weights + cache) / max(bandwidths)
    rows = []
    for label, context in contexts:
        rows.append({
            "context": label, "past_len": context,
            "eager_ms": 1e3 * statistics.median(eager_times[label]),
            "onnxruntime_ms": 1e3 * statistics.median(onnx_times[label]),
            "eager_ms_min": 1e3 * min(eager_times[label]), "onnxruntime_ms_min": 1e3 * min(onnx_times[label]),
        })
        print(f"{name} {label:>4} past_len={context:<5} eager min {rows[-1]['eager_ms_min']:8.2f} ms   "
              f"onnxruntime min {rows[-1]['onnxruntime_ms_min']:8.2f} ms   floor {1e3 * floor:7.2f} ms", flush=True)
    print(f"{name} bandwidth measurements (GB/s): {' '.join(f'{b / 1e9:.1f}' for b in bandwidths)}", flush=True)
    by = {r["context"]: r for r in rows}
    # Checks use the fastest step of each series: on a shared machine the median carries other
    # processes' load, the minimum is the best estimate of the step's own cost. Both are recorded.
    ort_w, ort_16w = by["W"]["onnxruntime_ms_min"], by["16W"]["onnxruntime_ms_min"]
    return {
        "model": name, "parameters": config.parameter_count(), "window": window,
        "config": {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                                   "num_heads", "num_kv_heads", "head_dim", "sliding_window")},
        "export_seconds": export_seconds,
        "bytes_per_step": {"weights": weights, "cache": cache},
        "floor_ms": 1e3 * floor, "bandwidth_gbs": max(bandwidths) / 1e9,
        "bandwidth_series": " ".join(f"{b / 1e9:.1f}" for b in bandwidths), "steps_per_context": rounds * per_round,
        "rows": rows,
        "checks": {
            "onnxruntime_16W_over_W": ort_16w / ort_w,
            "flat_within_10pct": abs(ort_16w / ort_w - 1) <= 0.10,
            "eager_16W_over_W": by["16W"]["eager_ms_min"] / by["W"]["eager_ms_min"],
            "onnxruntime_faster_than_eager_all": all(r["onnxruntime_ms_min"] < r["eager_ms_min"] for r in rows),
            "onnxruntime_over_floor_at_W": ort_w / (1e3 * floor),
            "within_1.3x_floor": ort_w / (1e3 * floor) <= 1.3,
        },
    }


def graph_node_counts(work: Path) -> dict:
    """Nodes per layer (count with 2 layers minus count with 1) at each stage of the pipeline.

    Node counts do not depend on the dimensions, so a small config with the same structure is used.
    """
    import warnings

    import onnxruntime as ort
    from graph_size_vs_optimum import after_ort, node_counts

    from mistral_export.export.onnx_export import _Flat
    from mistral_export.export.op_translation import translation_table
    from mistral_export.model.transformer import allocate_cache

    def count(path: Path) -> int:
        return node_counts(path)[0]

    def ort_optimized(path: Path) -> int:
        return after_ort(path, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)[0]

    stages: dict[str, list[int]] = {k: [] for k in (
        "dynamo exporter, optimize=False", "dynamo exporter, optimize=True (torch default)",
        "mistral-export model.onnx (mistral nodes as calls)", "model.onnx after ORT inlining + ORT_ENABLE_EXTENDED",
        "model.ort.onnx (bodies inlined, shared mask)", "model.ort.onnx after ORT_ENABLE_EXTENDED")}
    for layers in (1, 2):
        config = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=layers, num_heads=4,
                             num_kv_heads=2, head_dim=16, sliding_window=16)
        model = random_model(config)
        args = (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                *[t for pair in allocate_cache(config, 2) for t in pair])
        b, s = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dynamic = ({0: b, 1: s}, {0: b}, tuple({0: b} for _ in range(2 * layers)))
        for optimize, key in ((False, "dynamo exporter, optimize=False"),
                              (True, "dynamo exporter, optimize=True (torch default)")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(_Flat(model, False), args, dynamo=True, dynamic_shapes=dynamic,
                                            optimize=optimize, verbose=False,
                                            custom_translation_table=translation_table())
            stages[key].append(len(program.model_proto.graph.node))
        path = export_onnx(model, work / f"nodes{layers}")
        stages["mistral-export model.onnx (mistral nodes as calls)"].append(count(path))
        stages["model.onnx after ORT inlining + ORT_ENABLE_EXTENDED"].append(ort_optimized(path))
        artifact = write_onnxruntime_artifact(path)
        stages["model.ort.onnx (bodies inlined, shared mask)"].append(count(artifact))
        stages["model.ort.onnx after ORT_ENABLE_EXTENDED"].append(ort_optimized(artifact))
    return {k: {"per_layer": v[1] - v[0], "one_layer_total": v[0]} for k, v in stages.items()}


def machine(threads: int) -> dict:
    import onnx
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((line.split(":", 1)[1].strip() for line in open("/proc/meminfo") if line.startswith("MemTotal")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "threads": threads,
            "python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Decode step on CPU: eager vs ONNX Runtime (fp32)", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; {m['threads']} threads for both backends "
        f"(torch.set_num_threads, ORT intra_op_num_threads). Python {m['python']}, torch {m['torch']}, "
        f"onnx {m['onnx']}, onnxruntime {m['onnxruntime']}.",
        "Memory bandwidth: a numpy copy of 1 GiB (read + write bytes counted), measured before and between each "
        "model's timing rounds; each model's floor uses the best figure of its own period, as its step times use "
        f"their minimum. Best of the whole run {result['bandwidth_gbs']:.1f} GB/s; read-only stream (float32 "
        f"matrix-vector, numpy) {result.get('read_bandwidth_gbs', 0):.1f} GB/s. The floor uses the copy figure, "
        f"the higher (stricter) of the two.",
        f"Command: `{result['command']}`", "",
        "Batch 1, S=1; the cache is random and past_len set to the context. Checks use the fastest step of each",
        "series (the machine is shared with other jobs, which inflate medians); medians are shown beside them.",
        "Floor = (weights read per step + K/V cache) / bandwidth.", "",
    ]
    for r in result["models"]:
        c = r["checks"]
        lines += [
            f"## {r['model']} ({r['parameters'] / 1e6:.1f}M parameters, window {r['window']})", "",
            f"Bytes per step: weights {r['bytes_per_step']['weights'] / 1e6:.1f} MB, cache "
            f"{r['bytes_per_step']['cache'] / 1e6:.2f} MB; floor {r['floor_ms']:.2f} ms "
            f"(at {r['bandwidth_gbs']:.1f} GB/s; measurements {r['bandwidth_series']}). "
            f"{r['steps_per_context']} timed steps per context and backend.", "",
            "| context | past_len | eager ms (min / median) | ONNX Runtime ms (min / median) | ORT min / floor |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in r["rows"]:
            lines.append(f"| {row['context']} | {row['past_len']} | {row['eager_ms_min']:.2f} / {row['eager_ms']:.2f} "
                         f"| {row['onnxruntime_ms_min']:.2f} / {row['onnxruntime_ms']:.2f} "
                         f"| {row['onnxruntime_ms_min'] / r['floor_ms']:.2f}x |")
        lines += [
            "",
            f"- flat cost (ORT 16W / W = {c['onnxruntime_16W_over_W']:.3f}, target within 10%): "
            f"{'met' if c['flat_within_10pct'] else 'MISSED'}; eager 16W / W = {c['eager_16W_over_W']:.3f}",
            f"- ORT faster than eager at every context: {'met' if c['onnxruntime_faster_than_eager_all'] else 'MISSED'}",
            f"- ORT within 1.3x of the floor at W ({c['onnxruntime_over_floor_at_W']:.2f}x): "
            f"{'met' if c['within_1.3x_floor'] else 'MISSED'}; against the whole run's best bandwidth "
            f"{c['onnxruntime_over_floor_at_W'] * result['bandwidth_gbs'] / r['bandwidth_gbs']:.2f}x", "",
        ]
    if result.get("node_counts"):
        lines += ["## Graph size (nodes)", "",
                  "Per layer = nodes with 2 layers minus nodes with 1 layer (same structure, small dims).", "",
                  "| stage | per layer | total, 1 layer |", "| --- | --- | --- |"]
        for name, counts in result["node_counts"].items():
            lines.append(f"| {name} | {counts['per_layer']} | {counts['one_layer_total']} |")
        lines += ["", "Optimum's export of the same config: `benchmarks/results/graph_size_vs_optimum.md`.", ""]
    if result.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in result["notes"]], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", default="tiny,synthetic-170m")
    parser.add_argument("--skip-node-counts", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results, notes = [], []
    counts = {}
    with tempfile.TemporaryDirectory(prefix="decode_cpu_") as tmp:
        if not args.skip_node_counts:
            counts = graph_node_counts(Path(tmp))
            print(json.dumps(counts, indent=1), flush=True)
    with tempfile.TemporaryDirectory(prefix="decode_cpu_") as tmp, torch.inference_mode():
        for name in filter(None, args.models.split(",")):
            if name == "tiny":
                if not (TINY_DIR / "model.safetensors").exists():
                    notes.append("tiny fixture not present at run time: skipped")
                    continue
                model = load_model("tiny")
            elif name == "synthetic-170m":
                model = random_model(SYNTHETIC_170M, seed=0)
            else:
                sys.exit(f"unknown model {name}")
            results.append(bench_model(name, model, args.threads, args.steps, args.warmup, Path(tmp)))
            del model
    result = {"bandwidth_gbs": max((r["bandwidth_gbs"] for r in results), default=0.0), "models": results, "machine": machine(args.threads),
              "command": " ".join(["python", *sys.argv]), "notes": notes, "node_counts": counts,
              "read_bandwidth_gbs": read_bandwidth() / 1e9}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
