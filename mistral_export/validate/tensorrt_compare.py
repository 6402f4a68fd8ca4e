"""A TensorRT engine against the ONNX it was built from, with Polygraphy's Comparator (TensorRT machines only).

Both run the same feeds: a prefill from an empty cache, a chunk that crosses the window with a random cache, and a
decode step deep past the window. The engine's logits are compared with ONNX Runtime's (the function bodies of the
same model.onnx) by Polygraphy's simple comparison, and with the metrics and bars of every other case.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mistral_export.artifacts.folder import Artifact
from mistral_export.model.config import ModelConfig
from mistral_export.validate.cases import CaseResult, boundary
from mistral_export.validate.metrics import compare_rows
from mistral_export.validate.thresholds import THRESHOLDS

NAME = "TensorRT engine vs its ONNX on ONNX Runtime (Polygraphy Comparator)"
_NUMPY = {"float32": np.float32, "float16": np.float16}


def feeds(config: ModelConfig, cache_dtype: str, max_chunk: int) -> list[dict]:
    generator = np.random.default_rng(0)
    w = boundary(config)
    shape = (1, config.num_kv_heads, config.cache_capacity, config.head_dim)
    dtype = _NUMPY.get(cache_dtype, np.float32)

    def feed(seq: int, past: int, random_cache: bool) -> dict:
        cache = (
            (lambda: generator.standard_normal(shape).astype(dtype))
            if random_cache
            else (lambda: np.zeros(shape, dtype))
        )
        found = {
            "input_ids": generator.integers(3, config.vocab_size, (1, seq), dtype=np.int64),
            "past_len": np.array([past], dtype=np.int64),
        }
        for i in range(config.num_layers):
            found[f"past_key_values.{i}.key"], found[f"past_key_values.{i}.value"] = cache(), cache()
        return found

    return [feed(min(w + w // 2, max_chunk), 0, False), feed(min(w, max_chunk), w - 3, True), feed(1, 3 * w, True)]


def compare_with_onnx(artifact: Artifact, runner, onnx_folder: Path) -> dict | None:
    """A case report for the engine RUNNER has loaded (a TensorRTRunner) against onnx_folder/model.onnx, or None when
    that ONNX is not in the build. The comparison runs the runner's own engine (no second copy on the GPU)."""

    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    onnx_path = Path(onnx_folder) / "model.onnx"
    if not onnx_path.exists():
        return None
    data = feeds(runner.config, artifact.description.cache.dtype, runner.max_chunk)
    runners = [
        TrtRunner(runner.engine),  # a context of its own on the loaded engine
        OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"])),
    ]
    results = Comparator.run(runners, data_loader=data)
    case = CaseResult(NAME, "comparator")
    (_, engine_outputs), (_, onnx_outputs) = list(results)  # RunResults: (runner name, [outputs per feed])
    for feed, got, expected in zip(data, engine_outputs, onnx_outputs):
        got = torch.from_numpy(np.asarray(got["logits"], dtype=np.float32))[0]
        expected = torch.from_numpy(np.asarray(expected["logits"], dtype=np.float32))[0]
        start = int(feed["past_len"][0])
        case.rows.extend(compare_rows(got, expected, list(range(start, start + got.shape[0]))))
    report = case.report(artifact.precision)
    bar = THRESHOLDS.get(artifact.precision, {}).get("max_abs_logit_diff")
    if bar is not None:  # an absolute bar on logits (fp32): Polygraphy's own comparison checks it too
        accuracy = Comparator.compare_accuracy(
            results, compare_func=CompareFunc.simple(atol={"logits": bar, "": np.inf}, rtol={"logits": 0.0, "": np.inf})
        )
        report["checks"].append(
            {
                "metric": "polygraphy_compare_accuracy",
                "value": bool(accuracy),
                "bound": bar,
                "kind": "none",
                "passed": bool(accuracy),
            }
        )
        report["passed"] = report["passed"] and bool(accuracy)
    return report
