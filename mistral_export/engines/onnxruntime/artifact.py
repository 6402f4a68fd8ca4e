"""The ONNX Runtime artifact: the exported graph made into what ONNX Runtime runs fastest, same results.

First each layer's `mistral` attention and cache updates, with the RoPE and head split around them,
become one com.microsoft.GroupQueryAttention that updates the cache in place (onnxruntime_attention.py;
the runner binds `present.*` to the memory of `past_key_values.*`), which also drops the function bodies
with their per-layer mask arithmetic. The step's positions, RoPE tables and kernel lengths are computed
once for all layers; constant folding and CSE clean up, and `onnxruntime_fusions` takes the residual Adds
into the RMSNorms. The fp32 and fp16 artifacts share `model.onnx.data`; the INT8 ones carry their own
weights (quantized.py). Its artifact.json (artifacts/description.py) is written last: the folder is an artifact
only once that is there.
"""

from __future__ import annotations

import time
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort

from mistral_export.artifacts.description import (
    DESCRIPTION_FILE,
    SOURCE_ONNX_KEY,
    ArtifactDescription,
    CacheSpec,
    OnnxRuntimeSection,
)
from mistral_export.engines.graph_io import graph_io
from mistral_export.engines.onnxruntime import quantized
from mistral_export.engines.onnxruntime.attention import use_group_query_attention
from mistral_export.engines.onnxruntime.fusions import fuse_rms_norms
from mistral_export.errors import MistralExportError
from mistral_export.export.onnx_export import read_export_config
from mistral_export.export.onnxscript_passes import default_rewrite_pass, fold_constants_pass
from mistral_export.export.precision import PRECISION_KEY
from mistral_export.files import file_sha256, tool_version, written_atomically

ORT_MODEL_FILE = "model.ort.onnx"
ORT_DATA_FILE = ORT_MODEL_FILE + ".data"  # the INT8 artifacts' own weights (the others share model.onnx.data)
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")
_TRACED = {"float16": "fp16", "bfloat16": "bf16"}  # a plain export (no precision stage) is its traced dtype


def optimize_for_runtime(model: ir.Model) -> ir.Model:
    weights = {name for name, v in model.graph.initializers.items() if isinstance(v.const_value, ir.ExternalTensor)}
    cleanup = [common_passes.CommonSubexpressionEliminationPass(), common_passes.RemoveUnusedNodesPass()]
    ir.passes.Sequential(
        ir.passes.PassManager(
            [fold_constants_pass(weights, output_size_limit=1 << 20), default_rewrite_pass(), *cleanup],
            steps=3,
            early_stop=True,
        ),
        common_passes.RemoveUnusedFunctionsPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        *cleanup,
    )(model)
    fuse_rms_norms(model)
    ir.passes.Sequential(*cleanup)(model)
    return model


def write_onnxruntime_artifact(model_path: str | Path) -> ArtifactDescription:
    """Writes model.ort.onnx (and, for INT8, model.ort.onnx.data) next to model.onnx, then its artifact.json."""
    started = time.perf_counter()
    model_path = Path(model_path)
    folder = model_path.parent
    for stale in (DESCRIPTION_FILE, ORT_MODEL_FILE, ORT_DATA_FILE):  # they describe a model.onnx being replaced
        (folder / stale).unlink(missing_ok=True)
    config, metadata = read_export_config(model_path)
    artifact = folder / ORT_MODEL_FILE
    try:
        model = ir.load(str(model_path))  # weights stay external (lazy)
    except Exception as exc:  # noqa: BLE001 - onnx raises several unrelated types for a bad file
        raise MistralExportError(f"{model_path}: cannot read the ONNX model: {exc}") from None
    is_quantized = quantized.is_quantized(model)
    if is_quantized:
        quantized.to_float32_activations(model)
    use_group_query_attention(model)
    optimize_for_runtime(model)
    if is_quantized:
        quantized.to_matmul_nbits(model)
    onnx_sha256 = file_sha256(model_path)
    model.metadata_props[SOURCE_ONNX_KEY] = onnx_sha256
    if is_quantized:  # new weights: the artifact's own data file
        quantized.save_with_own_data(model, artifact)
    else:
        proto = ir.serde.serialize_model(model)  # ExternalTensors keep their location: model.onnx.data
        with written_atomically(artifact) as tmp:
            onnx.save(proto, str(tmp))
    io = graph_io(artifact)
    description = ArtifactDescription(
        backend="onnxruntime",
        precision=metadata.get(PRECISION_KEY) or _TRACED.get(metadata.get("mistral_export.dtype"), "fp32"),
        config=config,
        # The artifact's own cache type: the INT8 artifacts run fp32 activations and caches.
        cache=CacheSpec.of(config, io.input("past_key_values.0.key").dtype),
        io=io,
        onnx_sha256=onnx_sha256,
        last_token_logits=metadata.get("mistral_export.last_token_logits") == "1",
        tool_version=tool_version(),
        build_seconds=time.perf_counter() - started,
        onnxruntime=OnnxRuntimeSection(
            file=ORT_MODEL_FILE,
            version=ort.__version__,
            providers=PROVIDERS,
            own_data=ORT_DATA_FILE if is_quantized else None,
        ),
    )
    description.write(folder)
    return description
