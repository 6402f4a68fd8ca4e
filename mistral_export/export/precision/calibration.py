"""Calibration for the INT8 precisions: text → token samples → the model's real steps.

Each sample is run as a sequence is served (`step_plan`): its first tokens as prefill chunks (at most the
cache capacity each), the rest as decode steps of one token, every step reading the cache the previous
steps wrote. layerwise.py runs these steps one decoder layer at a time (int8); `calibration_steps` runs them
through the whole model (int4-awq and fp8, until they calibrate layer by layer too), yielding each step's inputs
with the live cache as it is *before* the step: a consumer reads it before asking for the next step, which then
writes it (a copy per step would be a full cache of every layer, a GiB for Mistral 7B).

The default text (`calibration_text.txt`, package data) is this project's own README and source code
as of its writing: Python code and English prose, neither the `tiny` fixture's training corpus (the
Python standard library) nor held-out text used to validate.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mistral_export.errors import MistralExportError
from mistral_export.model.transformer import Transformer, allocate_cache

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "calibration_text.txt"
DEFAULT_SAMPLES = 32
DEFAULT_SEQ_LEN = 256
DECODE_STEPS = 8  # per sample, after its prefill chunks (at most a quarter of the sample)


@dataclass(frozen=True)
class CalibrationOptions:
    data: Path | None = None  # plain text, or JSONL with a "text" field per line; None: the shipped text
    samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    tokenizer: Path | None = (
        None  # folder with tokenizer.json; None: the checkpoint's own (needed for in-memory models)
    )
    device: str = "cpu"  # where the layer-by-layer calibration runs ("cuda": a GPU); not part of the result

    def describe(self) -> dict:
        return {
            "data": Path(self.data).name if self.data else "calibration_text.txt (shipped default)",
            "samples": self.samples,
            "seq_len": self.seq_len,
            "decode_steps_per_sample": DECODE_STEPS,
        }


def read_documents(path: Path) -> list[str]:
    """Plain text (one document), or JSONL whose lines each hold a "text" field."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MistralExportError(f"--calib-data {path}: cannot read it as UTF-8 text ({exc})") from None
    if path.suffix != ".jsonl":
        return [raw]
    documents = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MistralExportError(f"--calib-data {path}, line {number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise MistralExportError(f'--calib-data {path}, line {number}: expected an object with a "text" string')
        documents.append(record["text"])
    return documents


def calibration_samples(options: CalibrationOptions, tokenizer) -> list[list[int]]:
    """`samples` consecutive windows of `seq_len` tokens from the documents (each starting with BOS)."""
    if options.samples < 1 or options.seq_len < 2:
        raise MistralExportError(
            f"--calib-samples must be >= 1 and --calib-seq-len >= 2, got {options.samples} and {options.seq_len}"
        )
    path = Path(options.data) if options.data else DEFAULT_TEXT
    if not path.is_file():
        raise MistralExportError(f"--calib-data {path}: no such file")
    stream: list[int] = []
    for document in read_documents(path):
        stream += tokenizer.encode(document)
    windows = [stream[i : i + options.seq_len] for i in range(0, len(stream) - options.seq_len + 1, options.seq_len)]
    if len(windows) < options.samples:
        raise MistralExportError(
            f"--calib-data {path}: {len(stream)} tokens make {len(windows)} samples of {options.seq_len} tokens, "
            f"{options.samples} requested; give more text or lower --calib-samples / --calib-seq-len"
        )
    return windows[: options.samples]


def step_plan(seq_len: int, capacity: int) -> list[tuple[int, int]]:
    """(start, length) of each step of one sample: prefill chunks of at most `capacity`, then decode steps."""
    decode = min(DECODE_STEPS, seq_len // 4)
    prefill = seq_len - decode
    chunks = [(start, min(capacity, prefill - start)) for start in range(0, prefill, capacity)]
    return chunks + [(position, 1) for position in range(prefill, seq_len)]


@dataclass(frozen=True)
class Step:
    input_ids: Tensor  # [1, S]
    past_len: Tensor  # [1]
    cache: list[tuple[Tensor, Tensor]]  # per layer (keys, values) before this step, [1, Hkv, C, D]


def calibration_steps(model: Transformer, samples: list[list[int]], progress=None) -> Iterator[Step]:
    """Every step of every sample through the whole model, with the live cache before it (read it before the next
    step writes it)."""
    plans = [step_plan(len(sample), model.config.cache_capacity) for sample in samples]
    task = progress.add_task("calibration", total=sum(map(len, plans))) if progress is not None else None
    dtype = next(model.parameters()).dtype
    try:
        with torch.inference_mode():
            for sample, plan in zip(samples, plans):
                cache = allocate_cache(model.config, 1, dtype)
                for start, length in plan:
                    ids = torch.tensor([sample[start : start + length]], dtype=torch.int64)
                    past_len = torch.tensor([start], dtype=torch.int64)
                    yield Step(ids, past_len, cache)
                    model(ids, past_len, cache)  # writes this step into the cache, in place
                    if task is not None:
                        progress.advance(task)
    finally:  # a build's progress lives on: its finished bar goes
        if task is not None:
            progress.remove_task(task)
