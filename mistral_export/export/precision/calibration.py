"""Calibration for the calibrated precisions (int8, int4-awq, fp8): text → token samples → the model's real steps.

Each sample is run as a sequence is served (`step_plan`): its first tokens as prefill chunks (at most the
cache capacity each), the rest as decode steps of one token, every step reading the cache the previous
steps wrote. layerwise.py runs these steps one decoder layer at a time for every calibrated precision.

The default text (`calibration_text.txt`, package data) is this project's own README and source code
as of its writing: Python code and English prose, neither the `tiny` fixture's training corpus (the
Python standard library) nor held-out text used to validate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mistral_export.errors import MistralExportError

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
