"""Where a CPU decode step's time goes: ONNX Runtime's profiler over our artifacts and onnxruntime-genai's models.

Each model is loaded into a plain ONNX Runtime session (this venv's onnxruntime; genai's venv pins the same
version) with `SessionOptions.enable_profiling`, the session options our runner uses (`session_options`: THREADS
intra-op threads, one inter-op, sequential, all graph optimizations), and runs decode steps (batch 1, S=1) at
past length CONTEXT (W by default):

- ours: an artifact folder (model.ort.onnx) run through OnnxRuntimeRunner, the cache random, past_len = CONTEXT,
  present.* bound to the memory of past_key_values.* (as every step of ours runs);
- genai: a folder of onnxruntime-genai's builder (model.onnx + genai_config.json) run as its generator runs it
  with `past_present_share_buffer`: past and present bound to the same [1, Hkv, max_length, D] buffers, the
  attention mask [1, CONTEXT + 1] (its GroupQueryAttention reads the past length from the mask). genai's own
  per-step work outside the session (its search, logits copy) is not in these numbers.

The first WARMUP runs are dropped; each node's kernel time per step is the median of its durations over the
other runs (the profiler's `Node` events, `*_kernel_time`; a median, since on a shared machine some steps are
preempted), with its minimum beside; per op type, the sum over its nodes. Before profiling, each model's steps
are also timed without the profiler (interleaved over rounds, fastest and median step), since the profiler adds
to every node: compare series by those. The lm_head is the GEMM whose output has the vocabulary as last dimension.
Several --ours folders (an artifact built before and after a change) race in the same run.

    python benchmarks/profile_decode_cpu.py --ours [LABEL=]build/decode_cpu/synthetic-170m-int8-* \
        --genai [LABEL=]build/decode_cpu/synthetic-170m-genai-*/int8 [--context W] [--steps 200] [--threads 2] \
        [--out benchmarks/results/profile_decode_cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mistral_export.runners.onnxruntime import OnnxRuntimeRunner, session_options

from provenance import markdown as provenance_markdown
from provenance import provenance, save_results


def profiled_options(threads: int, prefix: str | None) -> ort.SessionOptions:
    options = session_options(threads)
    if prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = prefix
    return options


class Ours:
    """An artifact folder run by our runner, its session optionally replaced by a profiled one."""

    kind = "ours"

    def __init__(self, folder: Path, threads: int, context: int, profile_prefix: str | None = None):
        self.runner = OnnxRuntimeRunner(folder, threads=threads)
        if profile_prefix is not None:  # same file, same options, plus the profiler (before any binding)
            self.runner.session = ort.InferenceSession(
                str(self.runner.session_path),
                profiled_options(threads, profile_prefix),
                providers=["CPUExecutionProvider"],
            )
        self.session = self.runner.session
        config = self.runner.config
        self.vocab = config.vocab_size
        self.runner.reset(1)
        g = np.random.default_rng(0)
        shape = (1, config.num_kv_heads, config.cache_capacity, config.head_dim)
        self.runner.fill_cache(
            [
                (g.standard_normal(shape, dtype=np.float32), g.standard_normal(shape, dtype=np.float32))
                for _ in range(config.num_layers)
            ]
        )
        self.token = torch.tensor([[7]])
        self.position = torch.tensor([context])  # past_len: a step's cost does not depend on it past the window

    def step(self) -> None:
        self.runner.step(self.token, self.position)


class Genai:
    """onnxruntime-genai's model.onnx run as its generator runs a decode step (shared past/present buffers)."""

    kind = "genai"

    def __init__(self, folder: Path, threads: int, context: int, profile_prefix: str | None = None):
        genai_config = json.loads((folder / "genai_config.json").read_text())
        decoder = genai_config["model"]["decoder"]
        self.vocab = genai_config["model"]["vocab_size"]
        max_length = genai_config["search"]["max_length"]
        if not genai_config["search"].get("past_present_share_buffer", False):
            raise SystemExit(f"{folder}: past_present_share_buffer is off; only the shared-buffer mode is modeled")
        self.session = ort.InferenceSession(
            str(folder / decoder["filename"]),
            profiled_options(threads, profile_prefix),
            providers=["CPUExecutionProvider"],
        )
        layers, kv_heads, head = decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]
        g = np.random.default_rng(0)
        self.cache = g.standard_normal((2 * layers, 1, kv_heads, max_length, head), dtype=np.float32)
        self.ids = np.full((1, 1), 7, dtype=np.int64)
        self.mask = np.ones((1, context + 1), dtype=np.int64)
        self.logits = np.empty((1, 1, self.vocab), dtype=np.float32)
        binding = self.session.io_binding()
        binding.bind_input("input_ids", "cpu", 0, np.int64, list(self.ids.shape), self.ids.ctypes.data)
        binding.bind_input("attention_mask", "cpu", 0, np.int64, list(self.mask.shape), self.mask.ctypes.data)
        binding.bind_output("logits", "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)
        inputs = {i.name for i in self.session.get_inputs()}
        for i in range(layers):
            for j, kind in enumerate(("key", "value")):
                buffer = self.cache[2 * i + j]
                for name in (f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"):
                    if name.startswith("past") and name not in inputs:
                        raise SystemExit(f"{folder}: no input {name}")
                    bind = binding.bind_input if name.startswith("past") else binding.bind_output
                    bind(name, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
        self.binding = binding

    def step(self) -> None:
        self.session.run_with_iobinding(self.binding)


def load(kind: str, folder: Path, threads: int, context: int, prefix: str | None = None):
    return (Ours if kind == "ours" else Genai)(folder, threads, context, prefix)


def time_unprofiled(series: dict[str, object], rounds: int, steps: int, warmup: int) -> dict[str, dict]:
    """Fastest and median step of each series without the profiler, interleaved over rounds."""
    times = {name: [] for name in series}
    names = list(series)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model = series[name]
            for i in range(warmup + steps):
                t = time.perf_counter()
                model.step()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t)
            time.sleep(0.05)  # the previous series' threads stop spinning
    return {
        name: {"min_ms": 1e3 * min(t), "median_ms": 1e3 * statistics.median(t), "steps": len(t)}
        for name, t in times.items()
    }


GEMM_OPS = ("MatMulNBits", "MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "FusedMatMul")


def aggregate(profile: Path, warmup: int, vocab: int) -> dict:
    """Per op type and per node: milliseconds and kernel calls per step, over the runs after WARMUP.

    A node's time per step is the median of its kernel's durations over the steps (a machine shared with other
    work preempts some steps: a mean would count those), its op type's the sum of its nodes'; the mean is kept
    beside (`mean_ms_per_step`)."""
    events = json.loads(profile.read_text())
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"]
    )
    kept = runs[warmup:]
    if not kept:
        raise SystemExit(f"{profile}: no runs after the {warmup} warmup runs")
    start = kept[0]["ts"]
    steps = len(kept)
    durations = defaultdict(list)  # node -> kernel durations (us), one per call
    op_of, lm_head = {}, set()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        node = e["name"].removesuffix("_kernel_time")
        op_of[node] = e["args"].get("op_name", "?")
        durations[node].append(e["dur"])
        shapes = e["args"].get("output_type_shape") or []
        last_dims = [(list(s.values())[0] or [None])[-1] for s in shapes if isinstance(s, dict)]
        if op_of[node] in GEMM_OPS and vocab in last_dims:
            lm_head.add(node)
    nodes = sorted(
        (
            {
                "node": node,
                "op": op_of[node],
                "ms_per_step": statistics.median(d) / 1e3 * len(d) / steps,
                "min_ms": min(d) / 1e3,
                "mean_ms_per_step": sum(d) / 1e3 / steps,
                "calls_per_step": len(d) / steps,
            }
            for node, d in durations.items()
        ),
        key=lambda x: -x["ms_per_step"],
    )
    per_op = defaultdict(
        lambda: {"ms_per_step": 0.0, "min_ms_per_step": 0.0, "mean_ms_per_step": 0.0, "calls_per_step": 0.0}
    )
    for n in nodes:
        for key in ("ms_per_step", "mean_ms_per_step", "calls_per_step"):
            per_op[n["op"]][key] += n[key]
        per_op[n["op"]]["min_ms_per_step"] += n["min_ms"] * n["calls_per_step"]
    ops = sorted(({"op": op, **v} for op, v in per_op.items()), key=lambda x: -x["ms_per_step"])
    run_ms = [r["dur"] / 1e3 for r in kept]
    gemm = [o for o in ops if o["op"] in GEMM_OPS]
    other = [o for o in ops if o["op"] not in GEMM_OPS]
    return {
        "steps": steps,
        "run_ms_min": min(run_ms),
        "run_ms_median": statistics.median(run_ms),
        "kernels_ms_per_step": sum(o["ms_per_step"] for o in ops),
        "kernels_min_ms_per_step": sum(o["min_ms_per_step"] for o in ops),
        "kernels_mean_ms_per_step": sum(o["mean_ms_per_step"] for o in ops),
        "kernel_calls_per_step": sum(o["calls_per_step"] for o in ops),
        "gemm_ms_per_step": sum(o["ms_per_step"] for o in gemm),
        "gemm_min_ms_per_step": sum(o["min_ms_per_step"] for o in gemm),
        "gemm_calls_per_step": sum(o["calls_per_step"] for o in gemm),
        "non_gemm_ms_per_step": sum(o["ms_per_step"] for o in other),
        "non_gemm_calls_per_step": sum(o["calls_per_step"] for o in other),
        "lm_head_nodes": sorted(lm_head),
        "lm_head_ms_per_step": sum(n["ms_per_step"] for n in nodes if n["node"] in lm_head),
        "lm_head_min_ms": sum(n["min_ms"] for n in nodes if n["node"] in lm_head),
        "per_op": ops,
        "per_node": nodes,
    }


def profile_all(
    series: dict[str, tuple[str, Path]], threads: int, context: int, steps: int, warmup: int, work: Path
) -> dict[str, dict]:
    """Every series profiled in the same rounds (WARMUP steps each, then STEPS in rounds of 10, each round's series
    in turn), so a burst of load from elsewhere falls on all of them alike."""
    models = {
        name: load(kind, folder, threads, context, str(work / f"{i}_{kind}"))
        for i, (name, (kind, folder)) in enumerate(series.items())
    }
    for model in models.values():
        for _ in range(warmup):
            model.step()
    names = list(models)
    for r in range(-(-steps // 10)):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for _ in range(min(10, steps - 10 * r)):
                models[name].step()
            time.sleep(0.05)
    profiles = {}
    for name, model in models.items():
        path = Path(model.session.end_profiling())
        profiles[name] = aggregate(path, warmup, model.vocab)
        path.unlink()
    return profiles


def markdown(result: dict) -> str:
    lines = [
        "# One CPU decode step under ONNX Runtime's profiler: our artifacts and onnxruntime-genai's models",
        "",
        provenance_markdown(result["provenance"]),
        f"Load: 1-minute load average {result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after "
        f"({os.cpu_count()} cores). {result['threads']} intra-op threads, batch 1, S=1, past length {result['context']}.",
        "",
        "Unprofiled steps (same session options, interleaved over rounds; the profiler adds to every node). genai's "
        "here is its model.onnx in a plain session, without its generator's own per-step work:",
        "",
        "| series | folder | fastest step ms | median step ms | fastest / genai's fastest |",
        "| --- | --- | --- | --- | --- |",
    ]
    reference = next((n for n, s in result["series"].items() if s["kind"] == "genai"), None)
    for name, s in result["series"].items():
        t = result["timing"][name]
        ratio = f"{t['min_ms'] / result['timing'][reference]['min_ms']:.3f}" if reference else "-"
        lines.append(f"| {name} | `{s['folder']}` | {t['min_ms']:.3f} | {t['median_ms']:.3f} | {ratio} |")
    lines += [
        "",
        f"Profiled ({result['steps']} steps after {result['warmup']} warmup runs each, all series in the same "
        "rounds), per step. A node's time is the median of its kernel's durations over the steps, beside the sum "
        "of each node's fastest; an op type's and a column's, the sum over its nodes:",
        "",
        "| series | run ms (min / median) | kernel calls | kernels ms (median / fastest) | GEMM ms (calls) "
        "| lm_head ms | non-GEMM ms (calls) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in result["series"]:
        p = result["profiles"][name]
        non_gemm_min = p["kernels_min_ms_per_step"] - p["gemm_min_ms_per_step"]
        lines.append(
            f"| {name} | {p['run_ms_min']:.3f} / {p['run_ms_median']:.3f} | {p['kernel_calls_per_step']:.0f} | "
            f"{p['kernels_ms_per_step']:.3f} / {p['kernels_min_ms_per_step']:.3f} | "
            f"{p['gemm_ms_per_step']:.3f} / {p['gemm_min_ms_per_step']:.3f} ({p['gemm_calls_per_step']:.0f}) | "
            f"{p['lm_head_ms_per_step']:.3f} / {p['lm_head_min_ms']:.3f} | "
            f"{p['non_gemm_ms_per_step']:.3f} / {non_gemm_min:.3f} ({p['non_gemm_calls_per_step']:.0f}) |"
        )
    names = list(result["series"])
    ops = sorted({o["op"] for n in names for o in result["profiles"][n]["per_op"]})
    table = {n: {o["op"]: o for o in result["profiles"][n]["per_op"]} for n in names}
    ops.sort(key=lambda op: -max(table[n].get(op, {}).get("ms_per_step", 0) for n in names))
    lines += ["", "Per op type, ms per step: median / sum of the nodes' fastest (kernel calls per step):", ""]
    lines.append("| op | " + " | ".join(names) + " |")
    lines.append("| --- |" + " --- |" * len(names))
    for op in ops:
        cells = []
        for n in names:
            o = table[n].get(op)
            cells.append(
                f"{o['ms_per_step']:.3f} / {o['min_ms_per_step']:.3f} ({o['calls_per_step']:.0f})" if o else "-"
            )
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    for n in names:
        lines += [
            "",
            f"Slowest nodes of {n} (ms per step):",
            "",
            "| node | op | median ms | min ms |",
            "| --- | --- | --- | --- |",
        ]
        for node in result["profiles"][n]["per_node"][: result["top"]]:
            lines.append(f"| `{node['node']}` | {node['op']} | {node['ms_per_step']:.4f} | {node['min_ms']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", action="append", default=[], help="[LABEL=]artifact folder (repeatable)")
    parser.add_argument("--genai", action="append", default=[], help="[LABEL=]genai model folder (repeatable)")
    parser.add_argument("--context", default="W", help="past length: N, or W / kW (multiples of our window)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200, help="profiled steps per series")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30, help="rounds of the unprofiled timing")
    parser.add_argument("--round-steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=12, help="slowest nodes listed per series")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "profile_decode_cpu")
    args = parser.parse_args()
    if not args.ours and not args.genai:
        parser.error("nothing to profile: give --ours and/or --genai")
    window = None
    for given in args.ours:
        window = OnnxRuntimeRunner(given.rpartition("=")[2]).config.sliding_window or window
    if args.context.endswith("W"):
        if window is None:
            parser.error("--context in W needs an --ours artifact with a window")
        context = window * int(args.context.removesuffix("W") or 1)
    else:
        context = int(args.context)
    torch.set_num_threads(args.threads)
    started = provenance(("torch", "onnx", "onnxruntime", "numpy"))
    load_before = os.getloadavg()
    series = {}
    for kind, folders in (("ours", args.ours), ("genai", args.genai)):
        for given in folders:
            label, _, path = str(given).rpartition("=")
            folder = Path(path)
            name = f"{kind}:{label or (folder.name if kind == 'ours' else folder.parent.name + '/' + folder.name)}"
            series[name] = (kind, folder.resolve())
    models = {name: load(kind, folder, args.threads, context) for name, (kind, folder) in series.items()}
    timing = time_unprofiled(models, args.rounds, args.round_steps, warmup=2)
    del models
    with tempfile.TemporaryDirectory(prefix="ort_profile_") as tmp:
        profiles = profile_all(series, args.threads, context, args.steps, args.warmup, Path(tmp))
    result = {
        "provenance": started,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "threads": args.threads,
        "context": context,
        "steps": args.steps,
        "warmup": args.warmup,
        "top": args.top,
        "series": {
            n: {"kind": k, "folder": os.path.relpath(f, ROOT) if f.is_relative_to(ROOT) else str(f)}
            for n, (k, f) in series.items()
        },
        "timing": timing,
        "profiles": profiles,
    }
    save_results(args.out, result, markdown(result), indent=1)


if __name__ == "__main__":
    main()
