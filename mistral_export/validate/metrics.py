"""Comparing an artifact's logits with the eager model's, position by position, and checking the bars.

Per position (one row of logits): max |Δ|, cosine similarity, top-1 agreement, KL divergence of the next-token
distributions (eager ‖ artifact), non-finite values, and cross-entropy of the next token when one is known.
A case aggregates its positions; `checks` compares the aggregates with the precision's thresholds
(validate/thresholds.py) plus the one rule every precision shares: no NaN or Inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mistral_export.validate.thresholds import GREEDY_TIE_RELATIVE, THRESHOLDS

# A rate over fewer positions moves in steps larger than the bars' 1%: top-1 agreement is checked on cases with
# at least this many positions, and on all positions pooled.
MIN_RATE_POSITIONS = 100
# The top-1 bar is a rate over the pooled positions (thresholds.py). One case of n positions drawn from an artifact
# exactly at the bar p falls below p about half the time, so a case is held to p less this many standard errors of
# a rate over n positions, sqrt(p (1 - p) / n): a path as good as the bar fails its case about once in a thousand,
# a broken path (chunked prefill gone wrong) still far below. fp8 on the fixture, 98.0% pooled against a 97% bar,
# had its 197-position chunked-prefill cases at 96.4%, 4 misses more than its whole-prompt prefill of the same text.
CASE_RATE_STANDARD_ERRORS = 3.0

# metric -> ("<=" | ">="): the direction of each bar in THRESHOLDS.
BOUND_KIND = {"max_abs_logit_diff": "<=", "top1_agreement": ">=", "greedy_match_tokens": ">=", "perplexity_ratio": "<="}


@dataclass
class PositionRows:
    """Per-position values of one case, in the order the positions were scored."""

    position: list[int] = field(default_factory=list)
    max_abs_diff: list[float] = field(default_factory=list)
    ref_max_abs: list[float] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)
    top1_agree: list[bool] = field(default_factory=list)
    top1_tie: list[bool] = field(default_factory=list)  # disagrees, but within a greedy tie (thresholds.py)
    kl: list[float] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)
    ce_artifact: list[float] = field(default_factory=list)
    ce_eager: list[float] = field(default_factory=list)

    def extend(self, other: PositionRows) -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))

    def __len__(self) -> int:
        return len(self.position)


def compare_rows(artifact: Tensor, eager: Tensor, positions: list[int], targets: Tensor | None = None) -> PositionRows:
    """PositionRows for logits [N,V] of both backends at N positions (targets [N]: next tokens, or None)."""
    a, e = artifact.double(), eager.double()
    finite = torch.isfinite(a)
    rows = PositionRows(position=list(positions))
    rows.nonfinite = (~finite).sum(-1).tolist()
    diff = (a - e).abs()
    # NaN propagates through max: a row with a NaN has max |Δ| NaN, which every check treats as a failure.
    rows.max_abs_diff = torch.where(finite.all(-1), diff.max(-1).values, torch.nan).tolist()
    rows.ref_max_abs = e.abs().max(-1).values.tolist()
    rows.cosine = torch.nn.functional.cosine_similarity(a, e, dim=-1).tolist()
    picks = a.argmax(-1)
    agree = picks == e.argmax(-1)
    top = e.max(-1).values
    gap = top - e.gather(-1, picks.view(-1, 1)).view(-1)  # eager's best logit minus eager's logit of the pick
    rows.top1_agree = agree.tolist()
    rows.top1_tie = (~agree & (gap <= GREEDY_TIE_RELATIVE * top.abs())).tolist()
    log_a, log_e = torch.log_softmax(a, -1), torch.log_softmax(e, -1)
    rows.kl = (log_e.exp() * (log_e - log_a)).sum(-1).tolist()
    if targets is not None:
        index = targets.view(-1, 1)
        rows.ce_artifact = (-log_a.gather(-1, index)).view(-1).tolist()
        rows.ce_eager = (-log_e.gather(-1, index)).view(-1).tolist()
    return rows


def _finite_or_nan(values: list[float], reduce) -> float:
    return reduce(values) if values and all(math.isfinite(v) for v in values) else math.nan


def aggregate(rows: PositionRows) -> dict[str, float | int]:
    """A case's metrics from its positions (NaN where a non-finite value makes a metric meaningless)."""
    metrics: dict[str, float | int] = {"positions": len(rows), "nonfinite_logits": int(sum(rows.nonfinite))}
    if not len(rows):
        return metrics
    max_abs = _finite_or_nan(rows.max_abs_diff, max)
    metrics["max_abs_logit_diff"] = max_abs
    metrics["rel_logit_error"] = max_abs / max(max(rows.ref_max_abs), 1e-30)
    metrics["min_cosine"] = _finite_or_nan(rows.cosine, min)
    metrics["top1_agreement"] = sum(rows.top1_agree) / len(rows)
    metrics["kl_mean"] = _finite_or_nan(rows.kl, lambda v: sum(v) / len(v))
    metrics["kl_max"] = _finite_or_nan(rows.kl, max)
    if rows.ce_eager:
        ppl_eager = math.exp(sum(rows.ce_eager) / len(rows.ce_eager))
        ppl_artifact = _finite_or_nan(rows.ce_artifact, lambda v: math.exp(sum(v) / len(v)))
        metrics.update(
            perplexity_eager=ppl_eager, perplexity_artifact=ppl_artifact, perplexity_ratio=ppl_artifact / ppl_eager
        )
    return metrics


def greedy_match(rows: PositionRows, ties: bool = True) -> int:
    """Leading generated tokens identical to eager's (rows after the prompt's last, fed eager's argmax); with
    `ties`, a position where the artifact picks a token tied with eager's (thresholds.py) counts as identical."""
    matched = 0
    for agree, tie in zip(rows.top1_agree, rows.top1_tie):
        if not (agree or (ties and tie)):
            break
        matched += 1
    return matched


def check(metric: str, value: float, bound: float) -> dict:
    kind = BOUND_KIND[metric]
    passed = math.isfinite(value) and (value <= bound if kind == "<=" else value >= bound)
    return {"metric": metric, "value": value, "bound": bound, "kind": kind, "passed": passed}


def case_rate_bound(bar: float, positions: int) -> float:
    """The top-1 agreement one case of POSITIONS is held to for a pooled bar BAR (CASE_RATE_STANDARD_ERRORS)."""
    return bar - CASE_RATE_STANDARD_ERRORS * math.sqrt(bar * (1 - bar) / positions)


def checks(metrics: dict, precision: str, kind: str) -> list[dict]:
    """The bars that apply to a case of KIND with METRICS at PRECISION (thresholds of precisions not in
    THRESHOLDS: none but the non-finite rule)."""
    bars = THRESHOLDS.get(precision, {})
    result = [
        {
            "metric": "nonfinite_logits",
            "value": metrics["nonfinite_logits"],
            "bound": 0,
            "kind": "==",
            "passed": metrics["nonfinite_logits"] == 0,
        }
    ]
    for metric, bound in bars.items():
        if metric not in metrics:
            continue
        if metric == "max_abs_logit_diff" and kind == "pooled":
            continue  # every case is already checked alone; pooling would only repeat the worst case's verdict
        if metric == "top1_agreement" and kind != "pooled":
            if metrics["positions"] < MIN_RATE_POSITIONS:
                continue
            bound = case_rate_bound(bound, metrics["positions"])
        result.append(check(metric, metrics[metric], bound))
    return result
