"""Soak of the served model: `mistral-export serve` on the tiny fixture under steady load for minutes.

CONCURRENCY clients over gRPC streaming, each sending one request after another for MINUTES: a prompt of random
length up to 3W tokens (slices of the held-out text), a random max_tokens up to 2W, and one request in ten
disconnecting mid-stream (the client stops its stream after a random number of pieces). Reported: requests
completed, error responses (target 0 besides the cancelled ones), the server's resident memory (tritonserver +
the model's Python stub, from /proc) after the warm-up minute and at the end (target growth <= 5%), p50/p99
inter-token latency per minute (target: flat), and every completed request's text against the single-request
greedy text of the same prompt (the same artifact run alone in this process before the server starts; target:
all equal). The server is started as a user starts it (`mistral-export serve` in a process of its own) and stopped
with SIGTERM.

    python benchmarks/serve_soak.py [--minutes 10] [--concurrency 16] [--disconnect 0.1] [--seed 0]

Writes benchmarks/results/serve_soak.{md,json} (with commit, command, versions, machine and the load average).
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import markdown as provenance_markdown
from benchmarks.provenance import provenance, save_results
from mistral_export.artifacts.folder import find_artifacts
from mistral_export.deploy.processes import PROC, descendants
from mistral_export.deploy.repository import package
from mistral_export.deploy.server import STUB_NAME, Ports, free_port
from mistral_export.model.config import TINY_DIR
from mistral_export.model.tokenizer import load_tokenizer
from mistral_export.pipeline.build import build
from mistral_export.runners import open_runner
from mistral_export.runners.base import greedy_tokens

RESULTS = ROOT / "benchmarks" / "results"
HELDOUT = ROOT / "mistral_export" / "validate" / "heldout.txt"
MODEL = "tiny"
PROMPT_POOL = 48  # distinct prompts (their single-request greedy texts are computed once)


def prompt_pool(tokenizer, window: int, rng: random.Random) -> list[str]:
    """PROMPT_POOL prompts of 1..3W tokens: slices of the held-out text, decoded (the server re-encodes them)."""
    ids = tokenizer.encode(HELDOUT.read_text(), add_bos=False)
    prompts = []
    while len(prompts) < PROMPT_POOL:
        length = rng.randint(1, 3 * window - 1)
        start = rng.randrange(0, len(ids) - length)
        text = tokenizer.decode(ids[start : start + length])
        if text.strip() and len(tokenizer.encode(text)) + 2 * window <= 4096:
            prompts.append(text)
    return prompts


def reference_ids(artifact, tokenizer, prompts: list[str], max_tokens: int) -> dict[str, list[int]]:
    """Each prompt's greedy continuation of MAX_TOKENS tokens, run alone on the artifact the server serves."""
    runner = open_runner(artifact)
    return {p: list(greedy_tokens(runner, tokenizer.encode(p), max_tokens, stop_id=tokenizer.eos_id)) for p in prompts}


def server_rss(serve_pid: int) -> int:
    """Resident bytes of serve's tritonserver and the stubs below it."""
    total = 0
    for pid, name in descendants(serve_pid).items():
        if name in ("tritonserver", STUB_NAME[:15]):
            try:
                status = (PROC / str(pid) / "status").read_text()
                total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) * 1024
            except (OSError, StopIteration):
                continue
    return total


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.completed = 0
        self.cancelled = 0
        self.errors: list[str] = []
        self.mismatches: list[dict] = []
        self.gaps: dict[int, list[float]] = {}  # minute -> inter-token gaps (s)

    def gap(self, minute: int, seconds: float) -> None:
        with self.lock:
            self.gaps.setdefault(minute, []).append(seconds)


def client(
    ports: Ports,
    prompts,
    references,
    tokenizer,
    stats: Stats,
    started: float,
    deadline: float,
    window: int,
    disconnect: float,
    seed: int,
) -> None:
    import tritonclient.grpc as grpcclient

    rng = random.Random(seed)
    connection = grpcclient.InferenceServerClient(f"127.0.0.1:{ports.grpc}")
    while time.monotonic() < deadline:
        prompt = rng.choice(prompts)
        max_tokens = rng.randint(1, 2 * window)
        cut_after = rng.randint(1, max(1, max_tokens // 2)) if rng.random() < disconnect else None
        inputs = []
        for name, value, dtype in (
            ("text_input", np.array([[prompt.encode()]], dtype=object), "BYTES"),
            ("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
            ("stream", np.array([[True]]), "BOOL"),
        ):
            tensor = grpcclient.InferInput(name, [1, 1], dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        results = queue.Queue()
        connection.start_stream(
            callback=lambda result, error, results=results: results.put((time.monotonic(), result, error))
        )
        connection.async_stream_infer(MODEL, inputs, enable_empty_final_response=True)
        pieces, last, outcome = [], None, None
        try:
            while outcome is None:
                at, result, error = results.get(timeout=120)
                if error is not None:
                    outcome = ("error", str(error))
                    break
                output = result.as_numpy("text_output")
                if output is not None:
                    pieces.append(output.reshape(-1)[0].decode())
                    if last is not None:
                        stats.gap(int((at - started) // 60), at - last)
                    last = at
                if result.get_response().parameters["triton_final_response"].bool_param:
                    outcome = ("completed", None)
                elif cut_after is not None and len(pieces) >= cut_after:
                    connection.stop_stream(cancel_requests=True)
                    outcome = ("cancelled", None)
        except queue.Empty:
            outcome = ("error", "no response for 120 s")
        finally:
            connection.stop_stream()
        with stats.lock:
            if outcome[0] == "completed":
                stats.completed += 1
                expected = tokenizer.decode(references[prompt][:max_tokens])
                if "".join(pieces) != expected:
                    stats.mismatches.append(
                        {"prompt": prompt, "max_tokens": max_tokens, "got": "".join(pieces), "expected": expected}
                    )
            elif outcome[0] == "cancelled":
                stats.cancelled += 1
            else:
                stats.errors.append(outcome[1])
    connection.close()


def wait_ready(ports: Ports, process, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"serve exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/models/{MODEL}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server was not ready in time")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--disconnect", type=float, default=0.1, help="share of requests that disconnect mid-stream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_soak")
    args = parser.parse_args()
    found = provenance(("onnxruntime", "nvidia-pytriton", "tritonclient"))
    load_before = os.getloadavg()
    rng = random.Random(args.seed)
    tokenizer = load_tokenizer(TINY_DIR)
    with tempfile.TemporaryDirectory(prefix="serve-soak-") as work:
        build_dir = build("tiny", Path(work) / "build")
        artifact = find_artifacts(build_dir)[0]
        window = artifact.description.config.sliding_window
        prompts = prompt_pool(tokenizer, window, rng)
        references = reference_ids(artifact, tokenizer, prompts, 2 * window)
        repository = Path(work) / "repository"
        package(build_dir, repository, name=MODEL, max_batch=args.concurrency)
        ports = Ports(free_port(), free_port(), free_port())
        log = open(Path(work) / "serve.log", "w")
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mistral_export.cli",
                "serve",
                str(repository),
                "--http-port",
                str(ports.http),
                "--grpc-port",
                str(ports.grpc),
                "--metrics-port",
                str(ports.metrics),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        try:
            wait_ready(ports, serve)
            stats = Stats()
            started = time.monotonic()
            deadline = started + 60 * args.minutes
            threads = [
                threading.Thread(
                    target=client,
                    args=(
                        ports,
                        prompts,
                        references,
                        tokenizer,
                        stats,
                        started,
                        deadline,
                        window,
                        args.disconnect,
                        args.seed + i,
                    ),
                )
                for i in range(args.concurrency)
            ]
            for thread in threads:
                thread.start()
            rss = {}
            warm = started + min(60, 60 * args.minutes / 2)
            while time.monotonic() < warm:
                time.sleep(1)
            rss["after warm-up"] = server_rss(serve.pid)
            for thread in threads:
                thread.join()
            rss["at the end"] = server_rss(serve.pid)
            assert serve.poll() is None, "serve died during the soak"
        finally:
            serve.send_signal(signal.SIGTERM)
            stopped = serve.wait(60)
            log.close()
            serve_log = (Path(work) / "serve.log").read_text()
    load_after = os.getloadavg()
    minutes = sorted(stats.gaps)
    per_minute = [
        {
            "minute": m + 1,
            "gaps": len(stats.gaps[m]),
            "p50_ms": round(1e3 * percentile(stats.gaps[m], 50), 2),
            "p99_ms": round(1e3 * percentile(stats.gaps[m], 99), 2),
        }
        for m in minutes
    ]
    growth = rss["at the end"] / rss["after warm-up"] - 1
    document = {
        "provenance": found,
        "settings": vars(args) | {"out": str(args.out), "window": window, "prompts": PROMPT_POOL},
        "load_average": {"before": load_before, "after": load_after},
        "completed": stats.completed,
        "cancelled_by_client": stats.cancelled,
        "error_responses": len(stats.errors),
        "errors": stats.errors[:20],
        "server_rss_bytes": rss,
        "rss_growth": growth,
        "inter_token_per_minute": per_minute,
        "texts_equal": stats.completed - len(stats.mismatches),
        "texts_different": len(stats.mismatches),
        "mismatches": stats.mismatches[:5],
        "serve_exit_code": stopped,
        "serve_stderr_errors": [line for line in serve_log.splitlines() if line.startswith("error:")],
    }
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    p50s = [m["p50_ms"] for m in per_minute]
    lines = [
        "# Soak: `mistral-export serve` on tiny",
        "",
        provenance_markdown(found).rstrip("\n"),
        f"Load average (1/5/15 min) before {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f}, after "
        f"{load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f}: other engineers' jobs shared the 2 cores with "
        "the server and the clients (latencies are the shared machine's, not the server's alone).",
        "",
        f"{args.minutes:g} minutes, {args.concurrency} gRPC streaming clients, prompts of 1..{3 * window - 1} tokens "
        f"({PROMPT_POOL} held-out slices), max_tokens 1..{2 * window}, {args.disconnect:.0%} of requests "
        f"disconnecting mid-stream; `--max-batch {args.concurrency}`, fp32 ONNX Runtime artifact.",
        "",
        "| what | value | target |",
        "|---|---|---|",
        f"| requests completed | {stats.completed} | |",
        f"| cancelled by their client (disconnect) | {stats.cancelled} | |",
        f"| error responses | {len(stats.errors)} | 0: {met(not stats.errors)} |",
        f"| completed texts equal to the single-request greedy text | {stats.completed - len(stats.mismatches)} of "
        f"{stats.completed} | all: {met(not stats.mismatches)} |",
        f"| server RSS after warm-up / at the end | {rss['after warm-up'] / 2**20:.1f} / "
        f"{rss['at the end'] / 2**20:.1f} MiB ({growth:+.1%}) | <= +5%: {met(growth <= 0.05)} |",
        f"| inter-token p50 per minute, max / min | {max(p50s):.2f} / {min(p50s):.2f} ms "
        f"({max(p50s) / min(p50s):.2f}x) | flat |"
        if p50s
        else "| inter-token latency | no data | |",
        f"| serve's exit code after SIGTERM | {stopped} | 0: {met(stopped == 0)} |",
        "",
        "| minute | inter-token gaps | p50 (ms) | p99 (ms) |",
        "|---|---|---|---|",
        *[f"| {m['minute']} | {m['gaps']} | {m['p50_ms']} | {m['p99_ms']} |" for m in per_minute],
        "",
        "Inter-token latency: the time between two consecutive streamed responses of one request, counted in the "
        "minute (since the start) the second one arrived; the last minute holds the requests finishing after the "
        "deadline. Cancelled requests are the clients' own disconnects (their requests end on the server with a "
        "CANCELLED error nobody reads).",
    ]
    save_results(args.out, document, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
