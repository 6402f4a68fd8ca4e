"""What `inspect DIR` prints for a build folder, read from build.json and each artifact's artifact.json."""

from __future__ import annotations

from pathlib import Path

from mistral_export.artifacts.folder import TOKENIZER_FILE, Artifact, find_artifacts, read_build
from mistral_export.errors import MistralExportError


def human_size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


def folder_bytes(folder: Path, names: list[str] | None = None) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and (names is None or p.name in names))


def _artifact_row(build_dir: Path, artifact: Artifact) -> tuple[str, str]:
    description = artifact.description
    where = str(artifact.folder.relative_to(build_dir))
    cache = description.cache
    window = f"window {cache.window}" if cache.window else "no window"
    common = f"cache {cache.capacity} slots ({window}, {cache.dtype}); built in {description.build_seconds} s"
    if description.onnxruntime:
        ort = description.onnxruntime
        size = folder_bytes(artifact.folder, [ort.file, ort.own_data, "model.onnx", "model.onnx.data"])
        detail = (
            f"{where}/{ort.file} ({human_size(size)} with the ONNX it shares weights with); ONNX Runtime "
            f"{ort.version}, providers {', '.join(p.removesuffix('ExecutionProvider') for p in ort.providers)}"
        )
    else:
        trt = description.tensorrt
        profile = trt.profiles[0]["input_ids"]
        level = trt.options.get("builder_optimization_level")
        detail = (
            f"{where}/{trt.file} ({human_size(folder_bytes(artifact.folder, [trt.file]))}); {trt.gpu} sm "
            f"{trt.compute_capability}, TensorRT {trt.version}, CUDA {trt.cuda_version}; batch "
            f"{profile['min'][0]}..{profile['max'][0]} (opt {profile['opt'][0]}), chunk 1..{profile['max'][1]}, "
            f"builder level {level if level is not None else 'default'}, plugins {trt.plugins}"
            + (f" (PTX ISA {trt.ptx_isa})" if trt.ptx_isa else "")
            + (
                ""
                if trt.cache_copies is None
                else f", cache copies inserted by TensorRT: {len(trt.cache_copies) or 'none'}"
            )
        )
    return f"{artifact.backend} {artifact.precision}", f"{detail}; {common}"


def describe_build(build_dir: str | Path) -> list[tuple[str, str]]:
    build_dir = Path(build_dir)
    build = read_build(build_dir)
    model = build.get("model", {})
    config = model.get("config", {})
    rows = [
        ("build folder", str(build_dir)),
        (
            "model",
            f"{model.get('name')} from {model.get('source') or 'an in-memory model'} (checkpoint sha256 "
            f"{str(model.get('checkpoint_sha256'))[:12]})",
        ),
        (
            "config",
            f"{config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}, heads "
            f"{config.get('num_attention_heads')}/{config.get('num_key_value_heads')}, head_dim "
            f"{config.get('head_dim')}, window {config.get('sliding_window')}, vocab {config.get('vocab_size')}",
        ),
        ("tool version", str(build.get("tool_version"))),
    ]
    stages = build.get("stages", {})
    tokenizer = stages.get("tokenizer")
    if (build_dir / TOKENIZER_FILE).exists():
        source = tokenizer["inputs"]["source"] if tokenizer else "?"
        rows.append(("tokenizer", f"{TOKENIZER_FILE} (from the checkpoint's {source})"))
    for name, entry in stages.items():
        if entry.get("kind") == "onnx":
            inputs = entry["inputs"]
            size = sum(o["size"] for o in entry["outputs"].values())
            options = ", ".join(f"{k} {v}" for k, v in inputs.get("precision_options", {}).items() if v is not None)
            rows.append(
                (
                    f"onnx {entry['precision']}",
                    f"{name}/model.onnx (+ .data, {human_size(size)}); opset "
                    f"{inputs['opset'] or 'default'}, plugin_impl {inputs['plugin_impl']}, last_token_logits "
                    f"{inputs['last_token_logits']}" + (f", {options}" if options else ""),
                )
            )
    try:
        artifacts = find_artifacts(build_dir)
    except MistralExportError:
        artifacts = []
    rows += [_artifact_row(build_dir, artifact) for artifact in artifacts]
    if not artifacts:
        rows.append(("artifacts", "none yet (an interrupted or failed build?)"))
    return rows


def last_run_rows(build_dir: str | Path) -> list[tuple[str, str, str, str]]:
    """(stage, built or unchanged, files, size) for each stage of the last `build` into BUILD_DIR."""
    build = read_build(Path(build_dir))
    rows = []
    for run in build["last_run"]:
        outputs = build["stages"][run["stage"]]["outputs"]
        action = f"built ({run['seconds']} s)" if run["action"] == "built" else "unchanged"
        rows.append((run["stage"], action, ", ".join(outputs), human_size(sum(o["size"] for o in outputs.values()))))
    return rows
