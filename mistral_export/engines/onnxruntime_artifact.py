"""The ONNX Runtime artifact: the exported graph with the `mistral` function bodies inlined and cleaned.

ONNX Runtime inlines model-local functions itself, but each inlined body then recomputes the slot
positions and the band mask from `past_len` and the shapes of its own inputs, per layer and per
step. Here the bodies are inlined ahead of time, `Shape` of a dimension the graph knows is replaced
by a constant (head counts, capacity, head dim) or by the one shared `Shape(input_ids)` slice
(batch, sequence), then constant folding and CSE leave one mask computation for all layers: what
remains per layer is the attention arithmetic itself. Last, `onnxruntime_fusions` takes the residual Adds
into the RMSNorms and makes rotate-half one Gather. The artifact shares `model.onnx.data`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from mistral_export.engines import onnxruntime_quantized
from mistral_export.errors import MistralExportError
from mistral_export.engines.onnxruntime_fusions import fuse_rms_norms, fuse_rotate_half
from mistral_export.export.onnxscript_passes import default_rewrite_pass, fold_constants_pass

ARTIFACT_FILE = "model.ort.onnx"


def _canonical_shapes(model: ir.Model) -> int:
    """Shape(x)[a:b] → constants and shared Shape(input_ids) slices where x's dims are known."""
    graph = model.graph
    ids = graph.inputs[0]
    if ids.name != "input_ids" or ids.shape is None or len(ids.shape) != 2:
        return 0
    first = next(iter(graph))
    shared: dict[str, ir.Value] = {}
    for axis, dim in enumerate(ids.shape):
        if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
            node = ir.node("Shape", [ids], attributes={"start": axis, "end": axis + 1})
            graph.insert_before(first, node)
            node.outputs[0].name = f"input_ids_dim{axis}"
            node.outputs[0].shape = ir.Shape([1])
            node.outputs[0].type = ir.TensorType(ir.DataType.INT64)
            shared[dim.value] = node.outputs[0]
    changed = 0
    for node in list(graph):
        if node.op_type != "Shape" or node.domain != "" or node.inputs[0] is ids:
            continue
        x = node.inputs[0]
        if x.shape is None:
            continue
        rank = len(x.shape)
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", rank)
        start, end = (max(0, min(rank, i + rank if i < 0 else i)) for i in (start, end))
        parts: list[ir.Value] = []
        for dim in list(x.shape)[start:end]:
            if isinstance(dim, int):
                const = ir.Value(name=None, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64))
                const.const_value = ir.tensor([dim], dtype=ir.DataType.INT64)
                parts.append(const)
            elif dim.value in shared:
                parts.append(shared[dim.value])
            else:
                break
        else:
            if not parts:
                continue
            for part in parts:
                if part.const_value is not None and not part.is_initializer():
                    part.name = f"{node.outputs[0].name}_dim{id(part) % 100000}"
                    graph.register_initializer(part)
            if len(parts) == 1:
                replacement = parts[0]
            else:
                concat = ir.node("Concat", parts, attributes={"axis": 0})
                graph.insert_before(node, concat)
                replacement = concat.outputs[0]
                replacement.shape = ir.Shape([len(parts)])
                replacement.type = ir.TensorType(ir.DataType.INT64)
            out = node.outputs[0]
            if out.is_graph_output():
                continue
            out.replace_all_uses_with(replacement)
            changed += 1
    return changed


def dedupe_small_constants(model: ir.Model, limit: int = 4096) -> int:
    """Merge equal small initializers (CSE compares inputs by identity); weights are never read."""
    graph = model.graph
    seen: dict[tuple, ir.Value] = {}
    merged = 0
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.size > limit or value.is_graph_input():
            continue
        key = (tensor.dtype, tuple(tensor.shape.numpy()), tensor.tobytes())
        if key not in seen:
            seen[key] = value
            continue
        if value.is_graph_output():
            continue
        value.replace_all_uses_with(seen[key])
        graph.initializers.pop(name)
        merged += 1
    return merged


MAX_ROUNDS = 10  # of merging and folding; the exported graphs need 2 (one that changes, one that confirms)


def _graph_size(model: ir.Model) -> tuple[int, int]:
    return sum(1 for _ in model.graph.all_nodes()), len(model.graph.initializers)


def optimize_for_runtime(model: ir.Model) -> ir.Model:
    weights = {name for name, v in model.graph.initializers.items() if isinstance(v.const_value, ir.ExternalTensor)}

    def fold():
        return fold_constants_pass(weights, output_size_limit=1 << 20)

    cleanup = [common_passes.CommonSubexpressionEliminationPass(), common_passes.RemoveUnusedNodesPass()]
    ir.passes.Sequential(common_passes.InlinePass(), fold(), *cleanup)(model)
    _canonical_shapes(model)
    ir.passes.Sequential(common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0))(model)
    # Merging equal constants lets CSE (which compares inputs by identity) merge the per-layer copies of the mask
    # arithmetic, whose results fold into new equal constants: repeat until a round leaves the graph's size alone.
    for _ in range(MAX_ROUNDS):
        size = _graph_size(model)
        dedupe_small_constants(model)
        ir.passes.Sequential(fold(), *cleanup)(model)
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        if _graph_size(model) == size:
            break
    else:
        raise RuntimeError(f"constant merging and folding still change the graph after {MAX_ROUNDS} rounds")
    dedupe_small_constants(model)
    ir.passes.Sequential(
        ir.passes.PassManager([fold(), default_rewrite_pass(), *cleanup],
                              steps=3, early_stop=True),
        common_passes.RemoveUnusedFunctionsPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        *cleanup,
    )(model)
    fuse_rms_norms(model)
    fuse_rotate_half(model)
    dedupe_small_constants(model)
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
