"""Load benchmark of the served model: genai-perf against `mistral-export serve`, at several concurrencies.

For each model (the tiny fixture, and a synthetic ~168M-parameter config with random weights) the script
builds the fp32 ONNX Runtime artifact, packages it (`--max-batch 16`), starts the server on 127.0.0.1 with
the OpenAI-compatible frontend, and at each concurrency runs genai-perf over each endpoint in turn, on the
same server: Triton's gRPC streaming (the text interface) and the OpenAI frontend's streamed
/v1/completions. Time to first token, inter-token latency (p50/p99), generated tokens/s; in-flight batching
shows as tokens/s growing with concurrency, and the frontend's cost as the OpenAI/gRPC ratio. The tokens
each request generated are read from the model's own counter (mistral_export_generated_tokens_total).

The synthetic config is decode_cpu.py's SYNTHETIC_170M with the fixture's vocabulary (2048) and 12
layers instead of 8 (168M parameters; the ~175M of SYNTHETIC_170M is mostly its 32000-row embedding
and head), so the fixture's tokenizer.json serves it and genai-perf counts its tokens with the same one.

genai-perf lives in its own venv (build/genai-perf-venv, made on first use): its tritonclient (<= 2.60,
which still ships perf_analyzer) needs protobuf < 6, the project's onnx >= 6.31. perf_analyzer also
needs libb64.so.0d and libcudart.so.12, which the nvidia-pytriton wheel carries under hashed names:
they are linked under those names into a folder on LD_LIBRARY_PATH.

    python benchmarks/serve_load.py [--models tiny,synthetic-168m] [--concurrency 1,4,16] [--endpoints grpc,openai]
                                    [--requests-per-client 3] [--input-tokens 32] [--output-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.decode_cpu import SYNTHETIC_170M
from benchmarks.provenance import markdown as provenance_markdown
from benchmarks.provenance import provenance
from mistral_export.deploy.openai_api import running_frontend
from mistral_export.deploy.repository import package
from mistral_export.deploy.server import Ports, free_port, running_server
from mistral_export.model.checkpoint import random_model, save_hf_checkpoint
from mistral_export.model.config import TINY_DIR, load_config
from mistral_export.pipeline.build import build

GENAI_PERF_VENV = ROOT / "build" / "genai-perf-venv"
GENAI_PERF_PACKAGES = ["genai-perf==0.0.16", "tritonclient[all]==2.51.0"]  # 2.51: perf_analyzer matching the server
SYNTHETIC = SYNTHETIC_170M.replace(vocab_size=2048, num_layers=12, name="synthetic-168m")
MAX_BATCH = 16
RESULTS = ROOT / "benchmarks" / "results"


def genai_perf() -> tuple[Path, dict[str, str]]:
    """The genai-perf executable of its own venv (created if missing) and the environment it needs."""
    executable = GENAI_PERF_VENV / "bin" / "genai-perf"
    if not executable.exists():
        subprocess.run([sys.executable, "-m", "venv", str(GENAI_PERF_VENV)], check=True)
        subprocess.run([str(GENAI_PERF_VENV / "bin" / "pip"), "install", "--quiet", *GENAI_PERF_PACKAGES], check=True)
    import pytriton

    wheel_libs = Path(pytriton.__file__).parents[1] / "nvidia_pytriton.libs"
    libs = GENAI_PERF_VENV / "perf_analyzer_libs"
    libs.mkdir(exist_ok=True)
    for name, pattern in (("libb64.so.0d", "libb64-*.so.0d"), ("libcudart.so.12", "libcudart-*.so.12*")):
        link = libs / name
        if not link.exists():
            link.symlink_to(next(wheel_libs.glob(pattern)))
    env = dict(
        os.environ,
        LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(libs), os.environ.get("LD_LIBRARY_PATH")])),
        PATH=f"{GENAI_PERF_VENV / 'bin'}{os.pathsep}{os.environ['PATH']}",
    )
    return executable, env


def build_model(name: str, work: Path) -> Path:
    if name == "tiny":
        return build("tiny", work / "tiny-build")
    checkpoint = work / f"{name}-checkpoint"
    save_hf_checkpoint(random_model(SYNTHETIC, seed=0), checkpoint)
    (checkpoint / "tokenizer.json").write_bytes((TINY_DIR / "tokenizer.json").read_bytes())
    return build(checkpoint, work / f"{name}-build")


def generated_tokens(ports: Ports) -> float:
    """The generate model's own count of the tokens it generated (all instances)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{ports.metrics}/metrics", timeout=10) as response:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in response.read().decode().splitlines()
            if line.startswith("mistral_export_generated_tokens_total{")
        )


def profile(
    executable: Path,
    env: dict,
    model: str,
    ports: Ports,
    openai_port: int,
    endpoint: str,
    concurrency: int,
    args,
    artifacts: Path,
) -> dict:
    requests = max(4, concurrency * args.requests_per_client)
    if endpoint == "grpc":
        target = [
            "--endpoint-type",
            "kserve",
            "--backend",
            "tensorrtllm",
            "-u",
            f"127.0.0.1:{ports.grpc}",
            "--output-tokens-mean-deterministic",
        ]  # min_length = max_tokens
    else:  # exact lengths through min_tokens (vLLM's extension, which the frontend maps to min_length); greedy as gRPC
        target = [
            "--endpoint-type",
            "completions",
            "-u",
            f"127.0.0.1:{openai_port}",
            "--extra-inputs",
            f"min_tokens:{args.output_tokens}",
            "--extra-inputs",
            "temperature:0",
        ]
    command = [
        str(executable),
        "profile",
        "-m",
        model,
        *target,
        "--streaming",
        "--tokenizer",
        str(TINY_DIR),
        "--synthetic-input-tokens-mean",
        str(args.input_tokens),
        "--synthetic-input-tokens-stddev",
        "0",
        "--output-tokens-mean",
        str(args.output_tokens),
        "--concurrency",
        str(concurrency),
        "--request-count",
        str(requests),
        "--warmup-request-count",
        str(concurrency),
        "--artifact-dir",
        str(artifacts),
    ]
    artifacts.mkdir(parents=True)
    tokens_before = generated_tokens(ports)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, cwd=artifacts.parent)
    tokens_per_request = (generated_tokens(ports) - tokens_before) / (requests + concurrency)
    (export,) = artifacts.rglob("*genai_perf.json")
    metrics = json.loads(export.read_text())
    pick = {"time_to_first_token": "ttft_ms", "inter_token_latency": "itl_ms", "request_latency": "request_latency_ms"}
    row = {
        "endpoint": endpoint,
        "concurrency": concurrency,
        "wall_s": round(time.perf_counter() - started, 1),
        "generated_tokens_per_request": round(tokens_per_request, 2),
    }
    for key, label in pick.items():
        row[label] = {stat: round(metrics[key][stat], 3) for stat in ("avg", "p50", "p99")}
    row["output_tokens_per_s"] = round(metrics["output_token_throughput"]["avg"], 2)
    row["requests_per_s"] = round(metrics["request_throughput"]["avg"], 3)
    row["generated_tokens_per_s"] = round(row["requests_per_s"] * tokens_per_request, 2)
    row["output_tokens_per_request"] = round(metrics["output_sequence_length"]["avg"], 1)
    return row


def server_version(ports: Ports) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2", timeout=10) as response:
        return json.loads(response.read())["version"]


def machine() -> dict:
    """Commit, command, versions and machine (benchmarks/provenance.py), genai-perf's pinned version beside."""
    found = provenance(("onnxruntime", "nvidia-pytriton", "tritonclient"))
    found["versions"]["genai-perf"] = GENAI_PERF_PACKAGES[0].split("==")[1] + " (own venv)"
    return found


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Served generation under load (genai-perf: Triton's gRPC streaming and the OpenAI frontend)",
        "",
        provenance_markdown(m).rstrip("\n"),
        f"Load average {result['load_average_before']} before, {result['load_average_after']} after "
        f"({m['machine']['cores']} cores). tritonserver {result['server_version']} (the nvidia-pytriton wheel's); "
        f"ONNX Runtime fp32 on the CPU with its default threads.",
        "",
        f"Each request: {result['input_tokens']} prompt tokens, {result['output_tokens']} output tokens asked for "
        f"exactly (gRPC: min_length = max_tokens; OpenAI: min_tokens, greedy); model packaged with --max-batch "
        f"{MAX_BATCH} (one instance); `mistral-export serve` with its OpenAI frontend (a thread of the serve "
        f"process) on the same 2 cores as the server and genai-perf. At each concurrency the endpoints run one "
        f"after the other on the same server. 'generated tokens/s' is requests/s x the tokens per request that the "
        f"model's own counter (mistral_export_generated_tokens_total) saw; genai-perf's output tokens/s re-tokenizes "
        f"the returned text, which for random weights' text gives other counts.",
        "",
    ]
    for model in result["models"]:
        rows = model["rows"]
        endpoints = list(dict.fromkeys(r["endpoint"] for r in rows))
        lines += [
            f"## {model['name']} ({model['parameters'] / 1e6:.0f}M parameters, window {model['window']})",
            "",
            "| endpoint | concurrency | round | load (1 min) | TTFT ms p50 / p99 | inter-token ms p50 / p99 | "
            "generated tokens/s | tokens per request | genai-perf output tokens/s | vs concurrency 1 | "
            "vs gRPC (same round) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        by = {(r["endpoint"], r["concurrency"], r.get("round", 1)): r for r in rows}
        for endpoint in endpoints:
            mine = [r for r in rows if r["endpoint"] == endpoint]
            base = mine[0]["generated_tokens_per_s"]
            for r in mine:
                grpc = by.get(("grpc", r["concurrency"], r.get("round", 1)))
                versus = f"{r['generated_tokens_per_s'] / grpc['generated_tokens_per_s']:.2f}x" if grpc else "-"
                lines.append(
                    f"| {endpoint} | {r['concurrency']} | {r.get('round', 1)} | "
                    f"{r.get('load_average_1min', '-')} | "
                    f"{r['ttft_ms']['p50']:.1f} / {r['ttft_ms']['p99']:.1f} | "
                    f"{r['itl_ms']['p50']:.1f} / {r['itl_ms']['p99']:.1f} | {r['generated_tokens_per_s']:.1f} | "
                    f"{r['generated_tokens_per_request']:.1f} | {r['output_tokens_per_s']:.1f} | "
                    f"{r['generated_tokens_per_s'] / base:.2f}x | {versus} |"
                )
        ratios = {}
        for r in rows:
            grpc = by.get(("grpc", r["concurrency"], r.get("round", 1)))
            if r["endpoint"] == "openai" and grpc:
                ratios.setdefault(r["concurrency"], []).append(
                    r["generated_tokens_per_s"] / grpc["generated_tokens_per_s"]
                )
        if ratios:
            lines += [
                "",
                "OpenAI / gRPC generated tokens/s, median over rounds: "
                + ", ".join(
                    f"concurrency {c}: {statistics.median(v):.2f}x ({len(v)} rounds)" for c, v in ratios.items()
                ),
            ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,synthetic-168m")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--endpoints", default="grpc,openai")
    parser.add_argument("--rounds", type=int, default=1, help="measurements of each endpoint per concurrency")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--input-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    args = parser.parse_args()
    executable, env = genai_perf()
    result = {
        "command": shlex.join(["python", "benchmarks/serve_load.py", *sys.argv[1:]]),
        "machine": machine(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "input_tokens": args.input_tokens,
        "output_tokens": args.output_tokens,
        "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            print(f"[serve_load] building {name}", file=sys.stderr)
            build_dir = build_model(name, work)
            repository = work / f"{name}-repository"
            package(build_dir, repository, name=name.replace("-", "_"), max_batch=MAX_BATCH)
            config = load_config("tiny") if name == "tiny" else SYNTHETIC
            ports, openai_port = Ports(free_port(), free_port(), free_port()), free_port()
            with (
                open(work / f"{name}-server.log", "w") as log,
                running_server(repository, ports, log=log),
                running_frontend(repository, f"127.0.0.1:{ports.grpc}", "127.0.0.1", openai_port),
            ):
                result["server_version"] = server_version(ports)
                rows = []
                for concurrency in map(int, args.concurrency.split(",")):
                    for round_ in range(args.rounds):  # the endpoints alternate first and second: load drifts
                        endpoints = args.endpoints.split(",")[:: -1 if round_ % 2 else 1]
                        for endpoint in endpoints:
                            print(
                                f"[serve_load] {name}: {endpoint}, concurrency {concurrency}, round {round_ + 1}",
                                file=sys.stderr,
                            )
                            folder = work / f"{name}-{endpoint}-c{concurrency}-r{round_}" / "artifacts"
                            rows.append(
                                {
                                    "round": round_ + 1,
                                    "load_average_1min": round(os.getloadavg()[0], 2),
                                    **profile(
                                        executable,
                                        env,
                                        name.replace("-", "_"),
                                        ports,
                                        openai_port,
                                        endpoint,
                                        concurrency,
                                        args,
                                        folder,
                                    ),
                                }
                            )
                            print(f"[serve_load]   {json.dumps(rows[-1])}", file=sys.stderr)
            result["models"].append(
                {"name": name, "parameters": config.parameter_count(), "window": config.sliding_window, "rows": rows}
            )
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "serve_load.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
