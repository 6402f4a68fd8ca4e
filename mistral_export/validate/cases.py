"""The parity cases: what validate feeds an artifact and the eager model, in lockstep, step by step.

A script is one batch of sequences from `reset` to its last step; each step may score its positions for a
named case (steps that only build up a context score nothing). Both runners see the same inputs; a greedy
script feeds both the eager model's argmax, so the artifact's first disagreement is where a free-running
greedy continuation of the artifact would leave the eager one. Comparing step by step keeps only one step's
logits in memory (a prefill of 3W tokens of a 32k vocabulary is already 1.5 GB).

W below is the sliding window (for a model without one, a quarter of the cache capacity, so that every
case fits in the linear cache).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mistral_export.model.config import ModelConfig
from mistral_export.runners.base import Runner
from mistral_export.validate.metrics import PositionRows, aggregate, checks, compare_rows, greedy_match
from mistral_export.validate.thresholds import THRESHOLDS


@dataclass
class Step:
    input_ids: Tensor  # [B,S]
    past_len: Tensor  # [B]
    case: str | None = None  # the case scoring this step's positions; None: builds context only
    score_from: int = 0  # first scored index along S
    targets: Tensor | None = None  # [B,S] next tokens (perplexity), or None


@dataclass
class Script:
    batch: int
    cases: dict[str, str]  # case name -> kind, in report order
    steps: Callable[[], Generator[Step, Tensor, None]]  # receives the eager logits of each step
    detail: dict = field(default_factory=dict)  # what the cases vary (chunk size...), recorded in the report


@dataclass
class CaseResult:
    name: str
    kind: str
    rows: PositionRows = field(default_factory=PositionRows)
    error: str | None = None
    detail: dict = field(default_factory=dict)

    def report(self, precision: str) -> dict:
        metrics = aggregate(self.rows)
        if self.kind == "greedy":
            metrics["greedy_match_tokens"] = greedy_match(self.rows)
            metrics["greedy_match_tokens_strict"] = greedy_match(self.rows, ties=False)
            metrics["generated_tokens"] = len(self.rows)
        found = checks(metrics, precision, self.kind)
        if self.error:
            found.append({"metric": "error", "value": self.error, "bound": None, "kind": "none", "passed": False})
        return {
            "name": self.name,
            "kind": self.kind,
            "passed": all(c["passed"] for c in found),
            "detail": self.detail,
            "metrics": metrics,
            "checks": found,
            "error": self.error,
            "per_position": {
                "position": self.rows.position,
                "max_abs_diff": [float(f"{d:.4g}") for d in self.rows.max_abs_diff],
                "top1_agree": self.rows.top1_agree,
            },
        }


def boundary(config: ModelConfig) -> int:
    return config.sliding_window or config.cache_capacity // 4


def _ids(tokens: list[int]) -> Tensor:
    return torch.tensor([tokens], dtype=torch.int64)


def _at(*positions: int) -> Tensor:
    return torch.tensor(positions, dtype=torch.int64)


def prefill_script(name: str, tokens: list[int]) -> Script:
    def steps():
        yield Step(_ids(tokens), _at(0), name)

    return Script(1, {name: "prefill"}, steps)


def greedy_script(name: str, prompt: list[int], new_tokens: int) -> Script:
    def steps():
        logits = yield Step(_ids(prompt), _at(0), name, score_from=len(prompt) - 1)
        for i in range(new_tokens - 1):
            token = int(logits[0, -1].argmax())
            logits = yield Step(torch.tensor([[token]]), _at(len(prompt) + i), name)

    return Script(1, {name: "greedy"}, steps)


def decode_script(tokens: list[int], w: int) -> Script:
    """Single decode steps at W-2 … W+2 and 3W (each its own case), the context between prefilled."""
    labels = {w - 2: "W-2", w - 1: "W-1", w: "W", w + 1: "W+1", w + 2: "W+2", 3 * w: "3W"}
    names = {p: f"decode at {label} ({p})" for p, label in labels.items()}

    def steps():
        done = 0
        for position, name in names.items():
            if position > done:
                yield Step(_ids(tokens[done:position]), _at(done))
            yield Step(_ids(tokens[position : position + 1]), _at(position), name)
            done = position + 1

    return Script(1, {name: "decode" for name in names.values()}, steps)


def chunked_script(tokens: list[int], chunk: int, w: int) -> Script:
    relation = "<" if chunk < w else "=" if chunk == w else ">"
    name = f"chunked prefill, chunk {chunk} ({relation}W), {len(tokens)} tokens"

    def steps():
        for start in range(0, len(tokens), chunk):
            yield Step(_ids(tokens[start : start + chunk]), _at(start), name)

    return Script(1, {name: "chunked"}, steps, {"chunk": chunk})


def batched_script(sequences: list[list[int]], targets: list[int], chunk: int, decode_steps: int) -> Script:
    """Sequence b brought to position targets[b], then `decode_steps` decode steps, every sequence at its own position.

    All rows of a step carry the same number of tokens, so the shorter sequences start by running their first
    chunk again (same tokens at the same positions: the same cache entries) until the others catch up.
    """
    name = f"batched decode, B={len(targets)} at {'/'.join(map(str, targets))}"
    chunks = math.ceil(max(targets) / chunk)

    def steps():
        for k in range(chunks):
            starts = [max(0, target - (chunks - k) * chunk) for target in targets]
            ids = torch.tensor([seq[s : s + chunk] for seq, s in zip(sequences, starts)])
            yield Step(ids, torch.tensor(starts))
        for i in range(decode_steps):
            ids = torch.tensor([[seq[t + i]] for seq, t in zip(sequences, targets)])
            yield Step(ids, torch.tensor([t + i for t in targets]), name)

    return Script(len(targets), {name: "batched"}, steps)


def heldout_script(tokens: list[int], chunk: int) -> Script:
    name = f"held-out text, {len(tokens)} tokens (perplexity)"
    inputs, targets = tokens[:-1], tokens[1:]

    def steps():
        for start in range(0, len(inputs), chunk):
            yield Step(
                _ids(inputs[start : start + chunk]), _at(start), name, targets=_ids(targets[start : start + chunk])
            )

    return Script(1, {name: "heldout"}, steps)


def stream(tokens: list[int], length: int) -> list[int]:
    """`length` tokens: the text, then the text again (without its BOS) as often as needed."""
    repeat = tokens[1:] if len(tokens) > 1 else tokens
    out = list(tokens)
    while len(out) < length:
        out += repeat
    return out[:length]


def greedy_length(quick: bool) -> int:
    """Enough generated tokens for the strictest greedy bar (twice as many in the full run)."""
    bar = max(int(t.get("greedy_match_tokens", 0)) for t in THRESHOLDS.values())
    return max(bar, 32) * (1 if quick else 2)


def default_prompt_lengths(config: ModelConfig, quick: bool) -> list[int]:
    w = boundary(config)
    return [w // 2, 3 * w + 5] if quick else [8, w // 2, w + w // 2, 3 * w + 5]


def scripts(config: ModelConfig, prompts: list[tuple[str, list[int]]], heldout: list[int], quick: bool) -> list[Script]:
    """Every script of a validate run (the --quick set: fewer prompts, greedy on one, chunks < W and > W)."""
    w = boundary(config)
    text = stream(heldout, 3 * w + 5)
    found = [prefill_script(f"prefill {name}", tokens) for name, tokens in prompts]
    new_tokens = greedy_length(quick)
    found += [
        greedy_script(f"greedy {new_tokens} tokens after {name}", tokens, new_tokens)
        for name, tokens in prompts[: 1 if quick else None]
    ]
    found.append(decode_script(text, w))
    chunks = [w // 2, w + w // 2] if quick else [w // 2, w, w + w // 2]
    found += [chunked_script(text, chunk, w) for chunk in chunks]
    targets = [w // 2 - 1, w + 1, 3 * w]
    long_text = stream(heldout, 3 * w + 8)
    sequences = [long_text[offset:] + long_text[:offset] for offset in (0, 17, 5)]  # three different texts
    found.append(batched_script(sequences, targets, w // 2, 4))
    found.append(heldout_script(heldout, w))
    return found


POOLED = "top-1 over prompts and held-out text (pooled)"


def run_script(script: Script, artifact: Runner, eager: Runner) -> list[CaseResult]:
    """Run SCRIPT on both runners in lockstep; the artifact's failure (a runtime error) fails its cases."""
    results = {name: CaseResult(name, kind, detail=script.detail) for name, kind in script.cases.items()}
    artifact.reset(script.batch)
    eager.reset(script.batch)
    generator = script.steps()
    step = next(generator)
    limit = getattr(artifact, "max_chunk", None)  # a TensorRT engine's longest step (its profile)
    while True:
        expected = split_step(eager, step.input_ids, step.past_len, limit)
        try:
            got = split_step(artifact, step.input_ids, step.past_len, limit)
        except Exception as exc:  # noqa: BLE001 - any runtime's failure on a broken artifact is a finding, not a crash
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            for result in results.values():
                if not len(result.rows):
                    result.error = message
            if step.case:
                results[step.case].error = message
            return list(results.values())
        if step.case:
            _score(results[step.case], step, got, expected)
        try:
            step = generator.send(expected)
        except StopIteration:
            return list(results.values())


def split_step(runner: Runner, input_ids: Tensor, past_len: Tensor, limit: int | None) -> Tensor:
    """One step, or consecutive chunks of at most LIMIT tokens (the same logits by the op contract)."""
    seq = input_ids.shape[1]
    if not limit or seq <= limit:
        return runner.step(input_ids, past_len)
    outputs = [runner.step(input_ids[:, i : i + limit], past_len + i) for i in range(0, seq, limit)]
    if outputs[0].shape[1] < limit:  # the runner keeps only each step's last position: the chunk's last is the step's
        return outputs[-1]
    return torch.cat(outputs, dim=1)


def _score(result: CaseResult, step: Step, got: Tensor, expected: Tensor) -> None:
    seq = step.input_ids.shape[1]
    first = max(step.score_from, seq - got.shape[1])  # an artifact keeping only the last position's logits
    offset = seq - got.shape[1]
    for b in range(step.input_ids.shape[0]):
        start = int(step.past_len[b])
        targets = step.targets[b, first:] if step.targets is not None else None
        result.rows.extend(
            compare_rows(
                got[b, first - offset :], expected[b, first:], list(range(start + first, start + seq)), targets
            )
        )


def pooled(results: list[CaseResult]) -> CaseResult:
    """Prompts and held-out text together: where DESIGN.md's top-1 bars apply."""
    total = CaseResult(POOLED, "pooled")
    for result in results:
        if result.kind in ("prefill", "heldout"):
            total.rows.extend(result.rows)
            total.error = total.error or result.error
    total.rows.ce_artifact, total.rows.ce_eager = [], []  # perplexity belongs to the held-out case alone
    return total
