"""The ONNX Runtime artifact: the exported graph made into what ONNX Runtime runs fastest, same results.

First each layer's `mistral` attention and cache updates, with the RoPE and head split around them,
become one com.microsoft.GroupQueryAttention that updates the cache in place (onnxruntime_attention.py;
the runner binds `present.*` to the memory of `past_key_values.*`), which also drops the function bodies
with their per-layer mask arithmetic. The step's positions, RoPE tables and kernel lengths are computed
once for all layers; constant folding and CSE clean up, and `onnxruntime_fusions` takes the residual Adds
into the RMSNorms. The fp32 and fp16 artifacts share `model.onnx.data`; the INT8 ones carry their own
weights (onnxruntime_quantized.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from mistral_export.engines import onnxruntime_quantized
from mistral_export.engines.onnxruntime_attention import use_group_query_attention
from mistral_export.engines.onnxruntime_fusions import fuse_rms_norms
from mistral_export.errors import MistralExportError
from mistral_export.export.onnxscript_passes import default_rewrite_pass, fold_constants_pass

ARTIFACT_FILE = "model.ort.onnx"


def optimize_for_runtime(model: ir.Model) -> ir.Model:
    weights = {name for name, v in model.graph.initializers.items() if isinstance(v.const_value, ir.ExternalTensor)}
    cleanup = [common_passes.CommonSubexpressionEliminationPass(), common_passes.RemoveUnusedNodesPass()]
    ir.passes.Sequential(
        ir.passes.PassManager([fold_constants_pass(weights, output_size_limit=1 << 20), default_rewrite_pass(),
                               *cleanup], steps=3, early_stop=True),
        common_passes.RemoveUnusedFunctionsPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        *cleanup,
    )(model)
    fuse_rms_norms(model)
    ir.passes.Sequential(*cleanup)(model)
    return model


SOURCE_KEY = "mistral_export.source_onnx_sha256"  # which model.onnx the artifact was made from


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_onnxruntime_artifact(model_path: str | Path) -> Path:
    """Writes model.ort.onnx next to model.onnx (sharing its weights file); returns its path."""
    model_path = Path(model_path)
    artifact = model_path.parent / ARTIFACT_FILE
    try:
        model = ir.load(str(model_path))  # weights stay external (lazy)
    except Exception as exc:  # noqa: BLE001 - onnx raises several unrelated types for a bad file
        raise MistralExportError(f"{model_path}: cannot read the ONNX model: {exc}") from None
    quantized = onnxruntime_quantized.is_quantized(model)
    if quantized:
        onnxruntime_quantized.to_float32_activations(model)
    use_group_query_attention(model)
    optimize_for_runtime(model)
    if quantized:
        onnxruntime_quantized.to_matmul_nbits(model)
    model.metadata_props[SOURCE_KEY] = file_sha256(model_path)
    if quantized:  # new weights: the artifact's own data file, model.ort.onnx.data
        onnxruntime_quantized.save_with_own_data(model, artifact)
        return artifact
    proto = ir.serde.serialize_model(model)  # ExternalTensors keep their location: model.onnx.data
    tmp = artifact.with_name(artifact.name + ".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(artifact)
    return artifact


def onnxruntime_artifact_for(model_path: Path) -> Path:
    """The model.ort.onnx made from `model_path`, or a clear error if it is missing or was made from another one."""
    artifact = model_path.parent / ARTIFACT_FILE
    hint = f"`mistral-export export MODEL -o {model_path.parent}` (or `build`) writes it"
    if not artifact.exists():
        raise MistralExportError(f"{artifact}: no ONNX Runtime artifact beside {model_path.name}; {hint}")
    meta = {p.key: p.value for p in onnx.load(str(artifact), load_external_data=False).metadata_props}
    if meta.get(SOURCE_KEY) != file_sha256(model_path):
        raise MistralExportError(f"{artifact}: made from another {model_path.name} (stale); {hint} again")
    return artifact
