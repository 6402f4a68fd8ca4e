"""The pipeline behind `mistral-export build`: export → precision → engine, into one build folder.

Layout and engine.json: engines/artifacts.py.
"""

from __future__ import annotations

import logging
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import onnxruntime as ort

from mistral_export.engines.artifacts import (BUILD_FILE, ENGINE_FILE, ENGINE_FORMAT, TOKENIZER_FILE, onnx_dir,
                                              write_json_atomic)
from mistral_export.engines.onnxruntime_artifact import ARTIFACT_FILE, file_sha256, write_onnxruntime_artifact
from mistral_export.errors import MistralExportError
from mistral_export.export.precision import check_precision, export_precision
from mistral_export.model.config import ModelConfig, load_config, resolve_model_dir
from mistral_export.model.transformer import Transformer

log = logging.getLogger(__name__)


def tool_version() -> str:
    try:
        return version("mistral-export")
    except PackageNotFoundError:
        return "0+unknown"


def cache_description(config: ModelConfig, dtype: str) -> dict:
    return {"capacity": config.cache_capacity, "window": config.sliding_window,
            "wraps": config.sliding_window is not None, "dtype": dtype}


def build(model: Transformer | str | Path, out_dir: str | Path, precision: str = "fp32",
          backend: str = "onnxruntime") -> Path:
    """Build MODEL (a checkpoint folder, `tiny`, or an in-memory Transformer) into OUT_DIR; returns OUT_DIR."""
    check_precision(precision)
    if backend != "onnxruntime":
        raise MistralExportError(f"backend {backend} is not available yet")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config if isinstance(model, Transformer) else load_config(model)
    source = None if isinstance(model, Transformer) else (str(model) if str(model) == "tiny"
                                                          else str(Path(model).resolve()))
    started = time.perf_counter()
    folder = onnx_dir(out, precision)
    model_path = export_precision(model, folder, precision)
    write_onnxruntime_artifact(model_path)
    engine = {
        "format": ENGINE_FORMAT,
        "backend": "onnxruntime",
        "precision": precision,
        "tool_version": tool_version(),
        "model": {"name": config.name, "config": config.to_hf_dict()},
        "cache": cache_description(config, "float16" if precision != "fp32" else "float32"),
        "onnx_sha256": file_sha256(model_path),
        "onnxruntime": {"file": ARTIFACT_FILE, "version": ort.__version__,
                        "providers": ["CPUExecutionProvider", "CUDAExecutionProvider"]},
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    write_json_atomic(folder / ENGINE_FILE, engine)
    model_dir = resolve_model_dir(model) if source else None
    if model_dir is not None and (model_dir / TOKENIZER_FILE).exists():
        tmp = out / f".{TOKENIZER_FILE}.tmp"
        shutil.copyfile(model_dir / TOKENIZER_FILE, tmp)
        tmp.replace(out / TOKENIZER_FILE)
    write_json_atomic(out / BUILD_FILE, {
        "format": 1,
        "tool_version": tool_version(),
        "model": {"source": source, "name": config.name, "config": config.to_hf_dict()},
        "artifacts": [str(folder.relative_to(out))],
    })
    return out
