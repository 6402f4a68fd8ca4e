"""Decode-step latency on CPU: every precision's ONNX Runtime artifact, eager torch and onnxruntime-genai.

For each model (the tiny fixture and a synthetic ~175M config) every CPU precision (fp32, fp16, int8, int8-wo,
int4-awq; fp8 is a GPU precision that ONNX Runtime's CPU provider runs only to validate it, by `--precisions`)
is exported with its ONNX Runtime artifact, and onnxruntime-genai's builder exports the same weights in
fp32, int8 and int4 (its CPU int4: MatMulNBits at accuracy level 4, its fastest). At each context (W, 16W, 64W) decode steps (S=1, batch 1) of every series are timed in
rounds, interleaved, all on the same threads: ours with a random cache and past_len set to the context
(cost depends only on the cache's capacity W), genai prefilled to the context (its cache grows).

genai runs in its own venv, benchmarks/.venv-genai, created on first use (`genai_python`); the worker is
benchmarks/genai_decode.py. The floor is the bytes a step must read (the GEMM initializers of the
file each series runs, plus the cache) over the fastest read measured in the same run, between the series of every round
(the best of numpy's matrix-vector product, torch's threaded sum and ONNX Runtime's own fp32 MatMul on a
1 x K input, the kernel a decode step runs, each over 512 MiB).

Exports are kept in build/decode_cpu/ (ours keyed by the model, the precision and the code under
mistral_export/, committed and not; genai's by the model and its venv's packages), so a rerun only measures.

    python benchmarks/decode_cpu.py [--threads 2] [--steps 4] [--rounds 24] [--models tiny,synthetic-170m]
                                    [--precisions fp32,fp16,int8,int8-wo,int4-awq] [--contexts W,16W,64W] [--no-genai]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mistral_export.artifacts.description import ArtifactDescription
from mistral_export.engines.onnxruntime.artifact import write_onnxruntime_artifact
from mistral_export.errors import MistralExportError
from mistral_export.export.onnx_export import export_onnx
from mistral_export.export.precision import PRECISIONS, CalibrationOptions, export_precision
from mistral_export.model.checkpoint import load_model, random_model, save_hf_checkpoint
from mistral_export.model.config import TINY_DIR, ModelConfig
from mistral_export.pipeline.progress import BuildProgress
from mistral_export.runners.base import EagerRunner
from mistral_export.runners.onnxruntime import OnnxRuntimeRunner, session_options

from provenance import markdown as provenance_markdown
from provenance import provenance, save_results

SEED = 0  # of the synthetic model's random weights
SYNTHETIC_170M = ModelConfig(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=3584,
    num_layers=8,
    num_heads=16,
    num_kv_heads=4,
    head_dim=64,
    sliding_window=256,
    name="synthetic-170m",
)


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
    return [
        (g.standard_normal(shape, dtype=np.float32), g.standard_normal(shape, dtype=np.float32))
        for _ in range(config.num_layers)
    ]


GENAI_PRECISIONS = ("fp32", "int8", "int4")
CPU_PRECISIONS = tuple(p for p in PRECISIONS if p != "fp8")
GENAI_VENV = ROOT / "benchmarks" / ".venv-genai"
GENAI_PACKAGES = ["onnxruntime-genai==0.18.0", "numpy<2", "transformers", "onnx", "onnx-ir"]


def genai_python() -> Path:
    """benchmarks/.venv-genai's python, creating the venv on first use (onnxruntime-genai pins its own
    onnxruntime, so it never enters the project's venv): torch 2.13.0 (CPU) first, then the builder's needs."""
    python = GENAI_VENV / "bin" / "python"
    if not (GENAI_VENV / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", str(GENAI_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *GENAI_PACKAGES], check=True)
        (GENAI_VENV / ".installed").touch()
    return python


class Genai:
    """onnxruntime-genai's exports of the same checkpoint, timed by benchmarks/genai_decode.py in its own venv."""

    def __init__(self, model, name: str, seed: int, threads: int, max_length: int):
        python = genai_python()
        packages = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
        work = cached_folder(f"{name}-genai", code_key(model.config, seed, max_length, threads, packages))
        hf = work / "hf"
        if not (hf / "tokenizer_config.json").exists():
            self._write_checkpoint(model, hf, max_length)
        script = str(ROOT / "benchmarks" / "genai_decode.py")
        self.folders = {}
        for precision in GENAI_PRECISIONS:
            out = work / precision
            if (
                not (out / "genai_config.json").exists()
                or "context_length" not in (out / "genai_config.json").read_text()
            ):
                built = subprocess.run(
                    [str(python), script, "build", str(hf), str(out), precision, str(threads)],
                    capture_output=True,
                    text=True,
                )
                if built.returncode:
                    sys.exit(f"onnxruntime-genai's builder failed ({precision}):\n{built.stderr[-3000:]}")
                genai_config = json.loads((out / "genai_config.json").read_text())
                # Its sliding-window cache mode refuses chunked prefill past the window; the graph's attention
                # keeps the window (GroupQueryAttention local_window_size) over a cache that grows to max_length.
                genai_config["model"]["decoder"].pop("sliding_window", None)
                genai_config["model"]["context_length"] = max_length
                (out / "genai_config.json").write_text(json.dumps(genai_config, indent=1))  # written last
            self.folders[precision] = out
        self.worker = subprocess.Popen(
            [str(python), script, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for precision, folder in self.folders.items():
            self.version = self.ask({"load": precision, "folder": str(folder), "max_length": max_length})["version"]

    @staticmethod
    def _write_checkpoint(model, hf: Path, max_length: int) -> None:
        """The weights in Hugging Face layout, as genai's builder reads them (written last: tokenizer_config.json)."""
        save_hf_checkpoint(model, hf)
        config = json.loads((hf / "config.json").read_text())
        config["max_position_embeddings"] = max(config["max_position_embeddings"], max_length)  # its RoPE table
        (hf / "config.json").write_text(json.dumps(config))
        shutil.copyfile(TINY_DIR / "tokenizer.json", hf / "tokenizer.json")  # the builder saves a tokenizer
        (hf / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"})
        )

    def ask(self, request: dict) -> dict:
        self.worker.stdin.write(json.dumps(request) + "\n")
        self.worker.stdin.flush()
        return json.loads(self.worker.stdout.readline())

    def prefill(self, precision: str, context: int) -> None:
        self.ask({"prefill": precision, "context": context, "chunk": 256})
        self.ask({"steps": precision, "count": 2})  # the first call only picks the token of the prefill

    def steps(self, precision: str, count: int) -> list[float]:
        return self.ask({"steps": precision, "count": count})["seconds"]

    def close(self) -> None:
        self.worker.stdin.close()
        self.worker.wait(timeout=60)


class ReadFloor:
    """The fastest plain read of memory this machine makes, three ways over 512 MiB of fp32, about a decode step's
    bytes (numpy's matrix-vector product, torch's threaded sum, ONNX Runtime's MatMul of a [1, K] input by a
    [K, N] initializer: the kernel of a decode step, weight prepacked, our runner's session options). `measure`
    runs each twice; it is called between the series of every round, so the best read sees the same moments
    of load as the steps."""

    def __init__(self, threads: int, size_bytes: int = 1 << 29, k: int = 4096):
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        self.size = size_bytes
        self.matrix = np.ones((size_bytes // 4 // k, k), dtype=np.float32)
        self.vector = np.ones(k, dtype=np.float32)
        self.tensor = torch.from_numpy(self.matrix)
        weight = np.random.default_rng(0).random((k, size_bytes // 4 // k), dtype=np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            "gemv",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[1]])],
            initializer=[numpy_helper.from_array(weight, "w")],
        )
        with tempfile.TemporaryDirectory(prefix="gemv_") as tmp:
            path = Path(tmp) / "gemv.onnx"
            onnx.save(
                helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                str(path),
                save_as_external_data=True,
            )
            del weight, graph
            self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        self.feed = {"x": np.ones((1, k), dtype=np.float32)}
        self.reads = {
            "numpy matrix-vector": lambda: self.matrix @ self.vector,
            "torch sum": self.tensor.sum,
            "onnxruntime MatMul 1xK": lambda: self.session.run(None, self.feed),
        }
        self.best = dict.fromkeys(self.reads, 0.0)  # bytes/s
        self.measure()

    def measure(self, repeats: int = 2) -> None:
        for name, read in self.reads.items():
            for _ in range(repeats):
                t = time.perf_counter()
                read()
                self.best[name] = max(self.best[name], self.size / (time.perf_counter() - t))

    @property
    def bandwidth(self) -> float:
        return max(self.best.values())


GEMM_OPS = ("MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
WEIGHT_PRODUCERS = ("DequantizeLinear", "Cast", "Transpose", "Reshape")  # ops between an initializer and a GEMM


def graph_of(model_path: Path) -> onnx.GraphProto:
    """MODEL_PATH's main graph, its external weights left unread (their types and shapes are in the file)."""
    return onnx.load(model_path, load_external_data=False).graph


def itemsize(data_type: int) -> int:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize


def gemm_read_bytes(graph: onnx.GraphProto) -> int:
    """Bytes of the initializers the GEMMs of GRAPH read each step (weights, scales, zero points, also through a
    DequantizeLinear or Cast in front of the GEMM), from the file's own tensor types and shapes. The floor follows
    the file each series runs: a formula per precision went stale when int4-awq's lm_head went to 4 bits."""
    sizes = {}
    for tensor in graph.initializer:
        count = math.prod(tensor.dims)
        if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            sizes[tensor.name] = (count + 1) // 2
        else:
            sizes[tensor.name] = count * itemsize(tensor.data_type)
    producers = {out: node for node in graph.node for out in node.output}
    read: set[str] = set()

    def visit(name: str) -> None:
        if name in sizes:
            read.add(name)
        elif (node := producers.get(name)) is not None and node.op_type in WEIGHT_PRODUCERS:
            for source in node.input:
                visit(source)

    for node in graph.node:
        if node.op_type in GEMM_OPS:
            for name in node.input[1:]:  # input 0 is the activation
                visit(name)
    return sum(sizes[name] for name in read)


def runner_file(model_path: Path) -> Path:
    """The ONNX file OnnxRuntimeRunner loads for the export at MODEL_PATH (its artifact.json names it)."""
    return model_path.parent / ArtifactDescription.read(model_path.parent).file


def step_read_bytes(config: ModelConfig, model_path: Path) -> int:
    """What a decode step at W must read: MODEL_PATH's GEMM initializers, and a full cache of the type of its
    past_key_values inputs."""
    graph = graph_of(model_path)
    [cache_type] = {i.type.tensor_type.elem_type for i in graph.input if i.name.startswith("past_key_values.")}
    return gemm_read_bytes(graph) + config.kv_cache_bytes(config.cache_capacity, itemsize(cache_type))


EXPORTS = ROOT / "build" / "decode_cpu"  # exports kept between runs


def code_key(*parts) -> str:
    """Short hash of `parts` and of mistral_export/ as committed (its tree) and changed since (what an export
    depends on): a commit elsewhere in the repository keeps the exports."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=True).stdout

    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    digest.update(git("rev-parse", "HEAD:mistral_export"))
    digest.update(git("diff", "HEAD", "--", "mistral_export"))
    return digest.hexdigest()[:12]


def cached_folder(name: str, key: str) -> Path:
    """EXPORTS/NAME-KEY; other keys' folders of the same NAME are removed (an older export of the same thing)."""
    EXPORTS.mkdir(parents=True, exist_ok=True)
    for old in EXPORTS.glob(f"{name}-*"):
        if old.name.rsplit("-", 1)[0] == name and old.name != f"{name}-{key}":
            shutil.rmtree(old)
    return EXPORTS / f"{name}-{key}"


def export_all(name: str, model, precisions, seed: int) -> dict[str, Path]:
    paths = {}
    calibration = CalibrationOptions(samples=4, seq_len=128, tokenizer=TINY_DIR)  # speed only: any text does
    for precision in precisions:
        folder = cached_folder(f"{name}-{precision}", code_key(model.config, seed, precision, calibration))
        path = folder / "model.onnx"
        try:
            OnnxRuntimeRunner(folder)  # a complete artifact (its artifact.json and model.ort.onnx agree)
            print(f"{name} {precision}: export reused from {folder}", flush=True)
        except MistralExportError:  # none yet, or incomplete
            t = time.perf_counter()
            path = export_precision(
                model,
                folder,
                precision,
                calibration=calibration,
                progress=None if sys.stderr.isatty() else BuildProgress(quiet=True).bars,
            )
            write_onnxruntime_artifact(path)
            print(f"{name} {precision}: exported in {time.perf_counter() - t:.0f} s to {folder}", flush=True)
        paths[precision] = path
    return paths


def settle() -> None:
    """Let the previous series' ONNX Runtime threads stop spinning (they spin a while after each run) before
    the next series is timed, so no series pays for another's idle threads."""
    time.sleep(0.05)


def bench_model(name: str, model, seed: int, args) -> dict:
    config = model.config
    window = config.sliding_window
    contexts = [(label, window * int(label.removesuffix("W") or 1)) for label in args.contexts.split(",")]
    paths = export_all(name, model, args.precisions.split(","), seed)
    runners = {p: OnnxRuntimeRunner(path, threads=args.threads) for p, path in paths.items()}
    eager = EagerRunner(model)
    eager.reset(1)
    per_round = args.steps
    genai = None
    if args.genai:
        # Its exports bake RoPE tables of max_length rows: a length for the model, not the run, so they are reused.
        longest = max(64 * window, *(c for _, c in contexts)) + args.rounds * (per_round + args.warmup) + 64
        genai = Genai(model, name, seed, args.threads, 1 << (longest + 4096 - 1).bit_length())
    series = ["eager", *runners, *(f"genai-{p}" for p in (GENAI_PRECISIONS if genai else ()))]
    times = {(label, s): [] for label, _ in contexts for s in series}
    round_best = {(label, s): [] for label, _ in contexts for s in series}  # fastest step of each round
    floor = ReadFloor(args.threads)
    # Each context raced on its own, its series' steps interleaved over rounds, so a burst of load from
    # elsewhere on the machine does not fall on one series alone.
    for label, context in contexts:
        cache = random_cache(config, context)
        if genai:
            for p in GENAI_PRECISIONS:
                genai.prefill(p, context)
        for r in range(args.rounds):
            position = context + r * (per_round + args.warmup)

            def eager_steps(cache=cache, position=position):
                for i, (k, v) in enumerate(cache):
                    eager.cache[i][0].copy_(torch.from_numpy(k))
                    eager.cache[i][1].copy_(torch.from_numpy(v))
                return time_steps(eager, position, per_round, args.warmup)

            def our_steps(runner, cache=cache, position=position):
                runner.reset(1)
                runner.fill_cache(cache)
                return time_steps(runner, position, per_round, args.warmup)

            timed = {
                "eager": eager_steps,
                **{p: lambda runner=runner: our_steps(runner) for p, runner in runners.items()},
                **{
                    f"genai-{p}": lambda p=p: genai.steps(p, per_round + args.warmup)[args.warmup :]
                    for p in (GENAI_PRECISIONS if genai else ())
                },
            }
            order = series[r % len(series) :] + series[: r % len(series)]  # each series starts some rounds
            for s in order:
                settle()
                steps = timed[s]()
                times[(label, s)] += steps
                round_best[(label, s)].append(min(steps))
            floor.measure()
        print(f"{name} {label}: " + "  ".join(f"{s} {1e3 * min(times[(label, s)]):.2f}" for s in series), flush=True)
    if genai:
        genai.close()
    bandwidth = floor.bandwidth
    rows = [
        {
            "context": label,
            "past_len": context,
            **{f"{s}_ms_min": 1e3 * min(times[(label, s)]) for s in series},
            **{f"{s}_ms": 1e3 * statistics.median(times[(label, s)]) for s in series},
        }
        for label, context in contexts
    ]
    by = {r["context"]: r for r in rows}
    files = {p: runner_file(path) for p, path in paths.items()}
    if genai:
        files |= {f"genai-{p}": folder / "model.onnx" for p, folder in genai.folders.items()}
    floors = {s: 1e3 * step_read_bytes(config, file) / bandwidth for s, file in files.items()}
    # Each series at W beside the time its bytes take at the fastest read measured (genai's: its precision's).
    at_floor = [
        {
            "series": s,
            "floor_ms": floors[s],
            "ms_min": by["W"][f"{s}_ms_min"],
            "over_floor": by["W"][f"{s}_ms_min"] / floors[s],
        }
        for s in series
        if s in floors and "W" in by
    ]
    checks = {}

    def paired(ours: str, theirs: str) -> float:
        """Less sensitive to when load came: round by round, ours over theirs (each round's fastest step), median."""
        return statistics.median(a / b for a, b in zip(round_best[("W", ours)], round_best[("W", theirs)]))

    if "W" in by and "16W" in by and "fp32" in runners:
        checks["fp32_16W_over_W"] = by["16W"]["fp32_ms_min"] / by["W"]["fp32_ms_min"]
        checks["flat_within_10pct"] = abs(checks["fp32_16W_over_W"] - 1) <= 0.10
    if "fp32" in runners:
        checks["fp32_faster_than_eager_all"] = all(r["fp32_ms_min"] < r["eager_ms_min"] for r in rows)
    w = by.get("W")
    if w and "fp32" in runners:
        for p in ("int8", "int8-wo"):
            if p in runners:
                checks[f"{p}_speedup_over_fp32_at_W"] = w["fp32_ms_min"] / w[f"{p}_ms_min"]
                checks[f"{p}_at_least_2.5x"] = checks[f"{p}_speedup_over_fp32_at_W"] >= 2.5
        if genai:
            checks["fp32_over_genai_fp32_at_W"] = w["fp32_ms_min"] / w["genai-fp32_ms_min"]
            checks["fp32_no_slower_than_genai_fp32"] = checks["fp32_over_genai_fp32_at_W"] <= 1.0
            checks["fp32_over_genai_fp32_at_W_median_of_rounds"] = paired("fp32", "genai-fp32")
    if "int4-awq" in runners:
        sizes = {p: (path.parent / "model.onnx.data").stat().st_size for p, path in paths.items()}
        if "fp16" in sizes:
            checks["int4-awq_weight_bytes_over_fp16"] = sizes["int4-awq"] / sizes["fp16"]
            checks["int4-awq_weight_bytes_at_most_0.3x_fp16"] = checks["int4-awq_weight_bytes_over_fp16"] <= 0.3
            # The same without the embedding table and norms, which int4-awq keeps in fp16
            gemm = {p: gemm_read_bytes(graph_of(paths[p])) for p in ("int4-awq", "fp16")}
            checks["int4-awq_gemm_weight_bytes_over_fp16"] = gemm["int4-awq"] / gemm["fp16"]
        if w and "int8" in runners:
            checks["int4-awq_over_int8_at_W"] = w["int4-awq_ms_min"] / w["int8_ms_min"]
            checks["int4-awq_at_most_0.6x_int8_at_W"] = checks["int4-awq_over_int8_at_W"] <= 0.6
        if genai and w:
            checks["int4-awq_over_genai_int4_at_W"] = w["int4-awq_ms_min"] / w["genai-int4_ms_min"]
            checks["int4-awq_at_most_0.9x_genai_int4_at_W"] = checks["int4-awq_over_genai_int4_at_W"] <= 0.9
            checks["int4-awq_over_genai_int4_at_W_median_of_rounds"] = paired("int4-awq", "genai-int4")
        if genai and "64W" in by:
            checks["int4-awq_over_genai_int4_at_64W"] = by["64W"]["int4-awq_ms_min"] / by["64W"]["genai-int4_ms_min"]
            checks["int4-awq_at_most_0.3x_genai_int4_at_64W"] = checks["int4-awq_over_genai_int4_at_64W"] <= 0.3
    if genai:
        for p in ("int8", "int8-wo"):
            if p in runners and w:
                checks[f"{p}_over_genai_int8_at_W"] = w[f"{p}_ms_min"] / w["genai-int8_ms_min"]
                checks[f"{p}_no_slower_than_genai_int8_at_W"] = checks[f"{p}_over_genai_int8_at_W"] <= 1.0
                checks[f"{p}_over_genai_int8_at_W_median_of_rounds"] = paired(p, "genai-int8")
            if p in runners and "64W" in by:
                checks[f"{p}_over_genai_int8_at_64W"] = by["64W"][f"{p}_ms_min"] / by["64W"]["genai-int8_ms_min"]
                checks[f"{p}_at_most_half_genai_int8_at_64W"] = checks[f"{p}_over_genai_int8_at_64W"] <= 0.5
    return {
        "model": name,
        "parameters": config.parameter_count(),
        "window": window,
        "series": series,
        "config": {
            k: getattr(config, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_layers",
                "num_heads",
                "num_kv_heads",
                "head_dim",
                "sliding_window",
            )
        },
        "read_bandwidth_gbs": bandwidth / 1e9,
        "read_bandwidth_by_method_gbs": {m: b / 1e9 for m, b in floor.best.items()},
        "floor_ms": floors,
        "at_floor_W": at_floor,
        "steps_per_context": args.rounds * per_round,
        "rows": rows,
        "checks": checks,
        "genai_version": genai.version if genai else None,
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

    stages: dict[str, list[int]] = {
        k: []
        for k in (
            "dynamo exporter, optimize=False",
            "dynamo exporter, optimize=True (torch default)",
            "mistral-export model.onnx (mistral nodes as calls)",
            "model.onnx after ORT inlining + ORT_ENABLE_EXTENDED",
            "model.ort.onnx (GroupQueryAttention per layer)",
            "model.ort.onnx after ORT_ENABLE_EXTENDED",
        )
    }
    for layers in (1, 2):
        config = ModelConfig(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=96,
            num_layers=layers,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            sliding_window=16,
        )
        model = random_model(config)
        args = (
            torch.zeros(2, 3, dtype=torch.int64),
            torch.zeros(2, dtype=torch.int64),
            *[t for pair in allocate_cache(config, 2) for t in pair],
        )
        b, s = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dynamic = ({0: b, 1: s}, {0: b}, tuple({0: b} for _ in range(2 * layers)))
        for optimize, key in (
            (False, "dynamo exporter, optimize=False"),
            (True, "dynamo exporter, optimize=True (torch default)"),
        ):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    _Flat(model, False),
                    args,
                    dynamo=True,
                    dynamic_shapes=dynamic,
                    optimize=optimize,
                    verbose=False,
                    custom_translation_table=translation_table(),
                )
            stages[key].append(len(program.model_proto.graph.node))
        path = export_onnx(model, work / f"nodes{layers}")
        stages["mistral-export model.onnx (mistral nodes as calls)"].append(count(path))
        stages["model.onnx after ORT inlining + ORT_ENABLE_EXTENDED"].append(ort_optimized(path))
        artifact = write_onnxruntime_artifact(path)
        stages["model.ort.onnx (GroupQueryAttention per layer)"].append(count(artifact))
        stages["model.ort.onnx after ORT_ENABLE_EXTENDED"].append(ort_optimized(artifact))
    return {k: {"per_layer": v[1] - v[0], "one_layer_total": v[0]} for k, v in stages.items()}


def markdown(result: dict) -> str:
    lines = [
        "# Decode step on CPU: every precision's ONNX Runtime artifact, eager torch, and onnxruntime-genai",
        "",
        provenance_markdown(result["provenance"]).rstrip(),
        f"{result['threads']} threads everywhere (torch.set_num_threads, ORT intra_op_num_threads, genai session "
        f"options); onnxruntime-genai {result.get('genai_version') or 'not run'} in its own venv.",
        f"Load while it ran: {result['load']}",
        "",
        "Batch 1, S=1. Ours: the cache is random and past_len set to the context (W rows: cost does not "
        "depend on the position). genai: prefilled to the context with real tokens (its cache grows). Each context "
        "is raced on its own, every series' steps interleaved over rounds (each round starting with another "
        "series); checks use the fastest step of each series (the machine is shared), medians beside. Floor = bytes a step must read (the GEMM "
        "initializers of the file the series runs: weights, scales; + the cache) / the fastest read bandwidth measured in the same run (the best of "
        "numpy's matrix-vector product, torch's threaded sum and ONNX Runtime's fp32 MatMul of a 1 x K input, "
        "each over 512 MiB, measured twice per round between the series).",
        "",
    ]
    for r in result["models"]:
        c = r["checks"]
        series = r["series"]
        lines += [
            f"## {r['model']} ({r['parameters'] / 1e6:.1f}M parameters, window {r['window']})",
            "",
            f"Fastest read {r['read_bandwidth_gbs']:.1f} GB/s (best of each: "
            + ", ".join(f"{m} {b:.1f}" for m, b in r["read_bandwidth_by_method_gbs"].items())
            + f" GB/s). {r['steps_per_context']} timed steps per context and series.",
            "",
            "| context | past_len | " + " | ".join(f"{s} ms (min / median)" for s in series) + " |",
            "| --- | --- | " + " | ".join("---" for _ in series) + " |",
        ]
        for row in r["rows"]:
            lines.append(
                f"| {row['context']} | {row['past_len']} | "
                + " | ".join(f"{row[f'{s}_ms_min']:.2f} / {row[f'{s}_ms']:.2f}" for s in series)
                + " |"
            )
        lines.append("")
        if r.get("at_floor_W"):
            lines += [
                "At W, each series beside its floor (the bytes of its precision's step at the fastest read):",
                "",
                "| series | floor ms | fastest step ms | step / floor |",
                "| --- | --- | --- | --- |",
            ]
            lines += [
                f"| {f['series']} | {f['floor_ms']:.2f} | {f['ms_min']:.2f} | {f['over_floor']:.2f} |"
                for f in r["at_floor_W"]
            ]
            lines.append("")
        lines += [
            f"- {key}: {value:.3f}" if isinstance(value, float) else f"- {key}: {'met' if value else 'MISSED'}"
            for key, value in c.items()
        ]
        lines.append("")
    if result.get("node_counts"):
        lines += [
            "## Graph size (nodes, fp32)",
            "",
            "Per layer = nodes with 2 layers minus nodes with 1 layer (same structure, small dims).",
            "",
            "| stage | per layer | total, 1 layer |",
            "| --- | --- | --- |",
        ]
        for name, counts in result["node_counts"].items():
            lines.append(f"| {name} | {counts['per_layer']} | {counts['one_layer_total']} |")
        lines += ["", "Optimum's export of the same config: `benchmarks/results/graph_size_vs_optimum.md`.", ""]
    if result.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in result["notes"]], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per series, context and round")
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--models", default="tiny,synthetic-170m")
    parser.add_argument("--precisions", default=",".join(CPU_PRECISIONS))
    parser.add_argument("--contexts", default="W,16W,64W")
    parser.add_argument("--no-genai", dest="genai", action="store_false")
    parser.add_argument("--skip-node-counts", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    results, notes = [], []
    counts = {}
    if not args.skip_node_counts:
        with tempfile.TemporaryDirectory(prefix="decode_cpu_") as tmp:
            counts = graph_node_counts(Path(tmp))
    origin = provenance(("torch", "onnx", "onnxruntime", "numpy"))
    with torch.inference_mode():
        for name in filter(None, args.models.split(",")):
            if name == "tiny":
                model = load_model("tiny")
            elif name == "synthetic-170m":
                model = random_model(SYNTHETIC_170M, seed=SEED)
            else:
                sys.exit(f"unknown model {name}")
            results.append(bench_model(name, model, SEED, args))
            del model
    notes.append(
        "genai's exports come from its builder (onnxruntime_genai.models.builder -p fp32|int8|int4 -e cpu) "
        "on an HF-format copy of the same weights; its int8 and int4 are MatMulNBits, like ours."
    )
    load_after = os.getloadavg()
    result = {
        "models": results,
        "provenance": origin,
        "threads": args.threads,
        "load": f"1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
        f"({os.cpu_count()} cores)",
        "genai_version": next((r["genai_version"] for r in results if r["genai_version"]), None),
        "notes": notes,
        "node_counts": counts,
    }
    save_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
