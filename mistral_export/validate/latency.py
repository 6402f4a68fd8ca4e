"""Latency and memory of runners, measured in one process and interleaved so that ratios survive a busy machine.

A measurement is a prefill (time to first token: one step of L tokens from position 0) or a decode step (S = 1)
at a context depth, at some batch size. Decode steps start at the depth directly (past_len set, cache left
zero): a step's cost depends on the cache capacity and the batch, not on what the cache holds. Rounds
alternate between the runners and the measurements, so load from elsewhere on the machine spreads over all of
them instead of falling on one.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mistral_export.model.config import ModelConfig
from mistral_export.runners.base import Runner
from mistral_export.validate.cases import boundary, split_step

WARMUP_STEPS = 2


@dataclass(frozen=True)
class Measurement:
    kind: str  # "prefill" | "decode"
    batch: int
    tokens: int  # prefill: prompt length; decode: context (past_len) of the first step
    label: str = ""  # e.g. "4W"

    @property
    def name(self) -> str:
        what = f"prefill {self.tokens} tokens" if self.kind == "prefill" else f"decode at {self.label or self.tokens}"
        return f"{what}, batch {self.batch}"


@dataclass(frozen=True)
class Plan:
    measurements: list[Measurement]
    samples: int  # timed steps (decode) or prefills per measurement, over all rounds
    rounds: int


def decode_contexts(config: ModelConfig) -> list[tuple[str, int]]:
    """W/2, W, 4W, 16W (without a window: fractions of the linear cache, which a sequence may not pass)."""
    if config.sliding_window:
        w = config.sliding_window
        return [("W/2", w // 2), ("W", w), ("4W", 4 * w), ("16W", 16 * w)]
    c = config.cache_capacity
    return [("C/8", c // 8), ("C/4", c // 4), ("C/2", c // 2), ("7C/8", 7 * c // 8)]


def validate_plan(config: ModelConfig, quick: bool) -> Plan:
    """TTFT at several prompt lengths, decode at each context (batch 1), and decode at W with a larger batch."""
    w = boundary(config)
    lengths = [w // 2, 3 * w] if quick else [16, w // 2, w, 4 * w]
    larger_batch = 4 if quick else 8
    at_w = next(label for label, tokens in decode_contexts(config) if tokens >= w)
    measurements = [Measurement("prefill", 1, length) for length in lengths]
    measurements += [Measurement("decode", 1, tokens, label) for label, tokens in decode_contexts(config)]
    measurements.append(Measurement("decode", larger_batch, dict(decode_contexts(config))[at_w], at_w))
    return Plan(measurements, samples=12 if quick else 60, rounds=2 if quick else 4)


def grid_plan(config: ModelConfig, batches: list[int], prompt_lengths: list[int], samples: int) -> Plan:
    measurements = [Measurement("prefill", b, length) for b in batches for length in prompt_lengths]
    measurements += [
        Measurement("decode", b, tokens, label) for b in batches for label, tokens in decode_contexts(config)
    ]
    return Plan(measurements, samples=samples, rounds=min(4, samples))


def fit(plan: Plan, runner: Runner) -> Plan:
    """PLAN within a runner's batch limit (a TensorRT engine's profile), for both runners of a comparison."""
    limit = getattr(runner, "max_batch", None)
    if not limit:
        return plan
    fitted = [Measurement(m.kind, min(m.batch, limit), m.tokens, m.label) for m in plan.measurements]
    return Plan(list(dict.fromkeys(fitted)), plan.samples, plan.rounds)


def _time_prefill(runner: Runner, m: Measurement, count: int) -> list[float]:
    ids = torch.randint(3, runner.config.vocab_size, (m.batch, m.tokens), generator=torch.Generator().manual_seed(0))
    start = torch.zeros(m.batch, dtype=torch.int64)
    times = []
    for _ in range(count):
        runner.reset(m.batch)
        t = time.perf_counter()
        split_step(runner, ids, start, getattr(runner, "max_chunk", None))
        times.append(time.perf_counter() - t)
    return times


def _time_decode(runner: Runner, m: Measurement, count: int) -> list[float]:
    runner.reset(m.batch)
    token = torch.full((m.batch, 1), 7, dtype=torch.int64)
    times = []
    for i in range(WARMUP_STEPS + count):
        past_len = torch.full((m.batch,), m.tokens + i, dtype=torch.int64)
        t = time.perf_counter()
        runner.step(token, past_len)
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - t)
    return times


def summarize(m: Measurement, times: list[float]) -> dict:
    ms = 1e3 * np.asarray(times)
    p50 = float(np.percentile(ms, 50))
    tokens_per_step = m.batch * (m.tokens if m.kind == "prefill" else 1)
    return {
        "name": m.name,
        "kind": m.kind,
        "batch": m.batch,
        "tokens": m.tokens,
        "label": m.label,
        "samples": len(times),
        "p50_ms": p50,
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "min_ms": float(ms.min()),
        "tokens_per_s": tokens_per_step / (p50 / 1e3),
    }


def measure(
    runners: dict[str, Runner], plan: Plan, advance: Callable[[], None] = lambda: None
) -> dict[str, list[dict]]:
    """{runner name: one summary per measurement it can run}; `advance` is called after each (measurement, runner,
    round). A measurement past a runner's batch limit (a TensorRT engine's profile) is left out for that runner."""
    times = {
        (n, m): []
        for n, r in runners.items()
        for m in plan.measurements
        if m.batch <= (getattr(r, "max_batch", None) or m.batch)
    }
    per_round = max(1, plan.samples // plan.rounds)
    for _ in range(plan.rounds):
        for m in plan.measurements:
            for name, runner in runners.items():
                if (name, m) in times:
                    timer = _time_prefill if m.kind == "prefill" else _time_decode
                    times[name, m] += timer(runner, m, per_round)
                advance()
    return {name: [summarize(m, times[name, m]) for m in plan.measurements if (name, m) in times] for name in runners}


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux ≥ 4.0); False where it cannot, then peaks are process-wide."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def ratios(artifact: list[dict], eager: list[dict]) -> list[dict]:
    """artifact / eager per measurement: p50 time (below 1: faster) and tokens/s (above 1: faster)."""
    return [
        {"name": a["name"], "p50": a["p50_ms"] / e["p50_ms"], "tokens_per_s": a["tokens_per_s"] / e["tokens_per_s"]}
        for a, e in zip(artifact, eager)
    ]
