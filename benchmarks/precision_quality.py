"""Quality of the 4-bit and FP8 precisions on the tiny fixture, and of the choices behind them.

Each variant is exported from `tiny` (default calibration: the shipped text, 32 samples of 256 tokens) and run on
ONNX Runtime's CPU provider, both the portable model.onnx and (where there is one) the ONNX Runtime artifact,
over held-out text (the standard-library files tools/train_tiny.py held out of training, as tests/test_precision.py
reads them: 3 files x 384 tokens, prefilled in chunks of the window). Against the fp32 eager model: top-1 agreement
and the perplexity ratio, beside the bars in validate/thresholds.py.

Variants: int4-awq as shipped (AWQ, blocks of 128, the lm_head in 4 bits), the lm_head int8 (the previous
choice), blocks of 64 and 32, --no-awq (round-to-nearest); fp8 as shipped (lm_head fp16) and with the lm_head in E4M3 too; int8-wo for reference. Then the
fixture with activation-outlier channels injected (fp32 function unchanged, tests/test_precision.py's
`outlier_model`): AWQ against round-to-nearest. The variants that are not shipped patch a module constant (the
name of fp8's lm_head) or the int4 weight transform for the run.

    python benchmarks/precision_quality.py [--out benchmarks/results/precision_quality]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import mistral_export.export.precision as precision_module
from mistral_export.engines.onnxruntime.artifact import write_onnxruntime_artifact
from mistral_export.export.precision import CalibrationOptions, export_precision
from mistral_export.export.precision import fp8 as fp8_module
from mistral_export.export.precision.int4 import Int4Weights
from mistral_export.export.precision.int8 import quantize_per_output_channel
from mistral_export.model.checkpoint import load_model
from mistral_export.model.config import TINY_DIR
from mistral_export.runners.base import EagerRunner, prefill
from mistral_export.runners.onnxruntime import OnnxRuntimeRunner
from mistral_export.validate.thresholds import THRESHOLDS

from helpers import CHUNK, held_out_ids, outlier_model, perplexity
from provenance import markdown as provenance_markdown
from provenance import provenance, save_results


def measure(runner, reference: torch.Tensor, ids: torch.Tensor) -> dict:
    runner.reset(ids.shape[0])
    logits = prefill(runner, ids, CHUNK)
    return {
        "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
        "perplexity_ratio": perplexity(logits, ids) / perplexity(reference, ids),
    }


def variant(
    model,
    folder: Path,
    precision: str,
    reference,
    ids,
    *,
    patches: tuple = (),
    artifact: bool = True,
    **options,
) -> dict:
    """Export MODEL in PRECISION with OPTIONS (and module attributes PATCHES, (module, name, value) each, set for
    the export), then measure model.onnx and its ONNX Runtime artifact."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    started = time.perf_counter()
    try:
        calibration = CalibrationOptions(tokenizer=TINY_DIR)
        path = export_precision(model, folder, precision, calibration=calibration, **options)
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
    write_onnxruntime_artifact(path)  # its artifact.json describes the folder for the runner
    row = {
        "export_seconds": round(time.perf_counter() - started, 1),
        # model.onnx too: small scales (tiny's INT4 block scales) stay in the graph file
        "weights_bytes": sum((folder / name).stat().st_size for name in ("model.onnx", "model.onnx.data")),
        "model.onnx": measure(OnnxRuntimeRunner(path, portable=True), reference, ids),
    }
    if artifact:
        row["model.ort.onnx"] = measure(OnnxRuntimeRunner(path), reference, ids)
    return row


class Int8LmHead(Int4Weights):
    """The previous int4-awq: the lm_head int8, one scale per output channel (as int8-wo)."""

    def storage(self, sources):
        return torch.int8 if any(source.startswith("output.") for source in sources) else torch.int4

    def quantize(self, weight, dtype):
        return quantize_per_output_channel(weight) if dtype == torch.int8 else super().quantize(weight, dtype)

    def dequantize_attributes(self, slot):
        return {"axis": 1} if slot.dtype == torch.int8 else super().dequantize_attributes(slot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "precision_quality")
    args = parser.parse_args()
    origin = provenance(("torch", "onnx", "onnxruntime"))

    tiny = load_model("tiny")
    ids = held_out_ids()
    eager = EagerRunner(tiny)
    eager.reset(ids.shape[0])
    reference = prefill(eager, ids, CHUNK)
    plan = [
        ("int4-awq", "int4-awq (shipped: AWQ, blocks of 128, lm_head int4)", {}),
        ("int4-awq", "int4-awq, lm_head int8", {"patches": ((precision_module, "Int4Weights", Int8LmHead),)}),
        ("int4-awq", "int4-awq, blocks of 64", {"int4_block_size": 64}),
        ("int4-awq", "int4-awq, blocks of 32", {"int4_block_size": 32}),
        ("int4-awq", "int4-awq --no-awq (round-to-nearest)", {"awq": False}),
        ("fp8", "fp8 (shipped: lm_head fp16)", {}),
        ("fp8", "fp8, lm_head in E4M3 too", {"patches": ((fp8_module, "LM_HEAD", "<none>"),)}),
        ("int8-wo", "int8-wo (reference)", {}),
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="precision_quality_") as tmp, torch.inference_mode():
        for i, (precision, name, options) in enumerate(plan):
            row = variant(tiny, Path(tmp) / str(i), precision, reference, ids, **options)
            rows.append({"variant": name, "precision": precision, "model": "tiny", **row})
            print(name, json.dumps(row), flush=True)
        outliers = outlier_model(tiny)
        for name, use_awq in (("int4-awq --no-awq (round-to-nearest)", False), ("int4-awq (AWQ)", True)):
            row = variant(
                outliers, Path(tmp) / f"outliers-{use_awq}", "int4-awq", reference, ids, awq=use_awq, artifact=False
            )
            rows.append({"variant": name, "precision": "int4-awq", "model": "tiny with activation outliers", **row})
            print("outliers", name, json.dumps(row), flush=True)
    result = {
        "provenance": origin,
        "rows": rows,
        "thresholds": {p: THRESHOLDS[p] for p in ("int4-awq", "fp8", "int8-wo")},
    }
    lines = [
        "# int4-awq and fp8 quality on the tiny fixture (and the choices behind them)",
        "",
        provenance_markdown(origin).rstrip(),
        "",
        "ONNX Runtime CPU against the fp32 eager model over held-out text (3 standard-library files the fixture "
        "never saw, 384 tokens each). Bars: "
        + "; ".join(
            f"{p} top-1 >= {b['top1_agreement']:.0%}, perplexity ratio <= {b['perplexity_ratio']}"
            for p, b in result["thresholds"].items()
        )
        + ".",
        "",
        "| model | variant | model.onnx + data | top-1 model.onnx | perplexity ratio model.onnx | "
        "top-1 model.ort.onnx | perplexity ratio model.ort.onnx |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ort = r.get("model.ort.onnx")
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['weights_bytes'] / 2**20:.2f} MiB | "
            f"{r['model.onnx']['top1_agreement']:.1%} | {r['model.onnx']['perplexity_ratio']:.4f} | "
            + (f"{ort['top1_agreement']:.1%} | {ort['perplexity_ratio']:.4f} |" if ort else "- | - |")
        )
    save_results(args.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
