"""The export stage: eager model → one ONNX graph (prefill chunks and decode) with the `mistral` ops.

    export_onnx("tiny", "out/")            # a checkpoint folder or `tiny`: weights streamed
    export_onnx(model, "out/")              # an in-memory Transformer

How: the model is traced by the PyTorch dynamo exporter as a weightless skeleton (parameters
allocated but never touched), `attention_and_cache_update` emits the `mistral::` nodes, the graph
is cleaned (weight transposes become MatMul-layout initializers, projections that read the same
activation share one MatMul over their weights side by side, constant folding, CSE, reshape
targets become constants so no per-layer shape arithmetic runs at each step), the function bodies
are attached, and the weights are streamed from the checkpoint into `model.onnx.data`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch
from torch import Tensor, nn

from mistral_export.artifacts.description import DESCRIPTION_FILE
from mistral_export.errors import MistralExportError
from mistral_export.export import weight_streaming
from mistral_export.export.functions import function_protos
from mistral_export.export.onnxscript_passes import default_rewrite_pass, fold_constants_pass
from mistral_export.export.op_translation import translation_table
from mistral_export.export.weight_layout import fold_weight_transposes, fuse_parallel_projections, strip_wrapper_prefix
from mistral_export.model.checkpoint import Checkpoint, parameter_shapes
from mistral_export.model.config import ModelConfig, load_config, resolve_model_dir
from mistral_export.model.transformer import Attention, Block, FeedForward, RMSNorm, Transformer, rotary_inv_freq
from mistral_export.op_contract import DEFAULT_PLUGIN_IMPL, DOMAIN, NO_WINDOW, VERSION

DEFAULT_OPSET = 20
MIN_OPSET, MAX_OPSET = 18, 23
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
BATCH, SEQUENCE = "batch", "sequence"

log = logging.getLogger(__name__)


def input_names(num_layers: int) -> list[str]:
    names = ["input_ids", "past_len"]
    for i in range(num_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(num_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(num_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


class _Flat(nn.Module):
    """Flat tensor I/O around the model, so graph inputs and outputs map 1:1 to the contract."""

    def __init__(self, model: Transformer, last_token_logits: bool):
        super().__init__()
        self.model = model
        self.last_token_logits = last_token_logits

    def forward(self, input_ids: Tensor, past_len: Tensor, *flat_cache: Tensor):
        cache = [(flat_cache[2 * i], flat_cache[2 * i + 1]) for i in range(len(flat_cache) // 2)]
        logits, presents = self.model(input_ids, past_len, cache, self.last_token_logits)
        return (logits, *[t for pair in presents for t in pair])


def _skeleton(config: ModelConfig, dtype: torch.dtype) -> Transformer:
    """The model with uninitialized parameters: virtual memory only, never read."""
    with torch.device("meta"):
        skeleton = Transformer(config)
    skeleton = skeleton.to(dtype).to_empty(device="cpu")
    skeleton.inv_freq = rotary_inv_freq(config)
    return skeleton.eval()


def _trace(config: ModelConfig, dtype: torch.dtype, opset: int, last_token_logits: bool, plugin_impl: str) -> ir.Model:
    wrapper = _Flat(_skeleton(config, dtype), last_token_logits)
    batch, seq = 2, 3  # neither 0 nor 1, so neither dimension is specialized
    shape = (batch, config.num_kv_heads, config.cache_capacity, config.head_dim)
    args = (
        torch.zeros(batch, seq, dtype=torch.int64),
        torch.zeros(batch, dtype=torch.int64),
        # Never written, so the pages stay unbacked: a 32k-slot v0.3 cache costs no RAM here.
        *[torch.empty(shape, dtype=dtype) for _ in range(2 * config.num_layers)],
    )
    b, s = torch.export.Dim(BATCH, min=1), torch.export.Dim(SEQUENCE, min=1)
    dynamic = ({0: b, 1: s}, {0: b}, tuple({0: b} for _ in range(2 * config.num_layers)))
    # torch warns about every torchvision op it cannot register: noise for this model.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            dynamic_shapes=dynamic,
            optimize=False,
            verbose=False,
            opset_version=opset,
            input_names=input_names(config.num_layers),
            output_names=output_names(config.num_layers),
            custom_translation_table=translation_table(plugin_impl),
        )
    return program.model


def _constant_reshape_targets(model: ir.Model) -> int:
    """Reshape(x, Concat(Shape..., consts)) → Reshape(x, const) using 0 (copy dim) and -1. Returns count."""
    changed = 0
    for node in model.graph:
        if node.op_type != "Reshape" or node.domain != "":
            continue
        data, target = node.inputs[0], node.inputs[1]
        out = node.outputs[0]
        if target.const_value is not None or data.shape is None or out.shape is None:
            continue
        dims, unknown = [], 0
        for i, dim in enumerate(out.shape):
            if isinstance(dim, int):
                dims.append(dim)
            elif i < len(data.shape) and data.shape[i] == dim and dim.value is not None:
                dims.append(0)
            else:
                dims.append(-1)
                unknown += 1
        if unknown > 1:
            continue
        # allowzero=1 (torch's choice) makes 0 a literal size; batch and sequence are >= 1, so
        # "copy this dimension" (allowzero=0) has the same meaning for every valid input.
        node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
        const = ir.Value(name=f"{out.name}_shape", shape=ir.Shape([len(dims)]), type=ir.TensorType(ir.DataType.INT64))
        const.const_value = ir.tensor(dims, dtype=ir.DataType.INT64, name=const.name)
        model.graph.register_initializer(const)
        node.replace_input_with(1, const)
        changed += 1
    return changed


def _optimize(model: ir.Model, weights: set[str]) -> None:
    fold = fold_constants_pass(weights, output_size_limit=262144)
    ir.passes.Sequential(
        ir.passes.PassManager(
            [fold, default_rewrite_pass(), common_passes.RemoveUnusedNodesPass()], steps=2, early_stop=True
        ),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
    )(model)
    _constant_reshape_targets(model)
    ir.passes.Sequential(
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.NameFixPass(),
    )(model)


def _rename_dims(model: ir.Model) -> None:
    """Symbolic dims named `batch` and `sequence` everywhere (torch calls them s0, s70...)."""
    graph = model.graph
    ids = graph.inputs[0].shape
    names = {ids[0].value: BATCH, ids[1].value: SEQUENCE}
    values = [*graph.inputs, *graph.outputs, *(out for node in graph for out in node.outputs)]
    for value in values:
        if value.shape is None:
            continue
        value.shape = ir.Shape(
            [ir.SymbolicDim(names.get(d.value, d.value)) if isinstance(d, ir.SymbolicDim) else d for d in value.shape]
        )


def check_exportable(model: Transformer) -> None:
    """Refuse a model carrying anything the export would silently drop.

    The exporter traces a plain `Transformer` skeleton and streams its parameters: a quantizer module
    (ModelOpt's QuantLinear, TensorQuantizer), an extra buffer or parameter (ModelOpt SmoothQuant's
    `pre_quant_scale`) or a forward hook would change what the model computes without reaching the ONNX.
    """
    expected = parameter_shapes(model.config)
    allowed = (Transformer, Block, Attention, FeedForward, RMSNorm, nn.Linear, nn.Embedding, nn.ModuleList)
    for name, module in model.named_modules():
        if type(module) not in allowed:
            raise MistralExportError(
                f"model module '{name or '<root>'}' is a {type(module).__module__}.{type(module).__name__}, which the "
                f"exporter does not know (a quantizer?); export the plain model and choose --precision instead"
            )
        if module._forward_hooks or module._forward_pre_hooks:
            raise MistralExportError(
                f"model module '{name or '<root>'}' has forward hooks, which the export would "
                f"drop; remove them before exporting"
            )
    extra = [n for n, _ in model.named_parameters() if n not in expected]
    extra += [n for n, _ in model.named_buffers() if n != "inv_freq"]
    if extra:
        raise MistralExportError(
            f"model carries tensors the export would drop: {', '.join(extra[:5])}"
            f"{f' and {len(extra) - 5} more' if len(extra) > 5 else ''} (quantizer state such "
            f"as pre_quant_scale?); export the plain model and choose --precision instead"
        )


def export_onnx(
    model_or_folder: Transformer | str | Path,
    out_dir: str | Path,
    opset: int = DEFAULT_OPSET,
    last_token_logits: bool = False,
    dtype: torch.dtype = torch.float32,
    plugin_impl: str = DEFAULT_PLUGIN_IMPL,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export MODEL (a Transformer, a checkpoint folder, or `tiny`) to OUT_DIR/model.onnx (+ .data).

    One graph for prefill chunks and decode: inputs input_ids [B,S] int64, past_len [B] int64 and
    per layer past_key_values.{i}.key|value [B,Hkv,C,D]; outputs logits [B,S,V] ([B,1,V] with
    `last_token_logits`) and present.{i}.key|value. The `mistral` nodes carry `aot` 1 or 0 for
    `plugin_impl` "aot" or "jit" (which TensorRT plugin implementation binds). `metadata` adds
    metadata_props (the precision stage's keys). Returns the path of model.onnx.
    The ONNX Runtime artifact is another stage (engines/onnxruntime/artifact.py).
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise MistralExportError(f"opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET}")
    if dtype not in (torch.float32, torch.float16):
        raise MistralExportError(f"export dtype must be float32 or float16, got {dtype}")
    if isinstance(model_or_folder, Transformer):
        check_exportable(model_or_folder)
        config = model_or_folder.config
        source = model_or_folder

        def tensors():
            yield from source.named_parameters()
    else:
        config = load_config(model_or_folder)
        folder = resolve_model_dir(model_or_folder)
        if folder is None:
            raise MistralExportError(
                f"preset '{model_or_folder}' has shapes only, no weights; pass a checkpoint folder"
            )
        checkpoint = Checkpoint(folder, config)  # validates names and shapes before any tracing

        def tensors():
            # Read in the checkpoint's own dtype (no converted copy); write_weights casts block by block.
            yield from checkpoint.tensors(stored_dtype(checkpoint, dtype))

    return export_graph(
        config,
        tensors,
        out_dir,
        opset=opset,
        last_token_logits=last_token_logits,
        dtype=dtype,
        plugin_impl=plugin_impl,
        metadata=metadata,
    )


def export_graph(
    config: ModelConfig,
    tensors,
    out_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    last_token_logits: bool = False,
    dtype: torch.dtype = torch.float32,
    plugin_impl: str = DEFAULT_PLUGIN_IMPL,
    metadata: dict[str, str] | None = None,
    weights=None,
) -> Path:
    """OUT_DIR/model.onnx (+ .data) of CONFIG's graph traced in DTYPE, its weights streamed from `tensors()`
    ((internal name, tensor) pairs, any order). `weights` (a precision's weight transform: precision/int8.py's
    Int8Weights) chooses each slot's stored dtype, transforms the stream and places what it wrote in the graph."""
    out = Path(out_dir)
    with staged_model(out) as staging:
        _export_into(staging, config, tensors, dtype, opset, last_token_logits, plugin_impl, metadata or {}, weights)
    return out / MODEL_FILE


@contextlib.contextmanager
def staged_model(out: Path, model_file: str = MODEL_FILE):
    """A staging folder inside OUT (created if needed) whose MODEL_FILE (model.onnx) and MODEL_FILE.data move into OUT
    when the block completes.

    Everything is written there and moved into place only when complete and checked, so an interrupted
    export never leaves a model.onnx that looks valid beside half-written weights.
    """
    if out.exists() and not out.is_dir():
        raise MistralExportError(f"{out}: output must be a folder, and this is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MistralExportError(f"{out}: cannot create the output folder ({exc.strerror})") from None
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        yield staging
        (out / model_file).unlink(missing_ok=True)
        if model_file == MODEL_FILE:  # the ONNX Runtime artifact beside it (if any) described the model it replaces
            (out / DESCRIPTION_FILE).unlink(missing_ok=True)
        for name in (model_file + ".data", model_file):  # the model last: its presence means complete
            (staging / name).replace(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _export_into(
    folder: Path,
    config: ModelConfig,
    tensors,
    dtype: torch.dtype,
    opset: int,
    last_token_logits: bool,
    plugin_impl: str,
    metadata: dict[str, str],
    weights=None,
) -> None:
    model_path, data_path = folder / MODEL_FILE, folder / DATA_FILE
    log.info("tracing %s (%d layers) with the dynamo exporter, opset %d", config.name, config.num_layers, opset)
    traced = _trace(config, dtype, opset, last_token_logits, plugin_impl)
    strip_wrapper_prefix(traced)
    shapes = parameter_shapes(config)
    params = set(shapes)
    if set(traced.graph.initializers) - {"inv_freq"} != params:
        raise AssertionError("traced graph does not hold exactly the parameters as initializers")
    sources = fuse_parallel_projections(traced, fold_weight_transposes(traced, params))
    _optimize(traced, set(sources))

    graph = traced.graph
    entries = []
    for name, (source_names, transposed) in sources.items():
        widths = tuple(shapes[n][0] if transposed else shapes[n][-1] for n in source_names)
        entries.append((name, source_names, widths, transposed, tuple(graph.initializers[name].shape.numpy())))
    slots = weight_streaming.plan_layout(entries, dtype, weights.slot_dtypes(entries) if weights else None)
    total = sum(slot.length for slot in slots)
    log.info(
        "streaming %d checkpoint tensors into %d initializers (%.2f GiB, %s) in %s",
        sum(len(slot.sources) for slot in slots),
        len(slots),
        total / 2**30,
        weights.describe() if weights else str(dtype).removeprefix("torch."),
        DATA_FILE,
    )
    weight_streaming.write_weights(data_path, slots, weights.stream(tensors()) if weights else tensors())
    for slot in slots:
        external = weight_streaming.external_tensor(slot, data_path)
        if weights and weights.places(slot):
            weights.place(graph, slot, external)
        else:
            graph.initializers[slot.initializer].const_value = external

    _rename_dims(traced)
    traced.opset_imports[DOMAIN] = VERSION
    traced.metadata_props.update(
        {
            "mistral_export.config": json.dumps(config.to_hf_dict()),
            "mistral_export.model_name": config.name,
            "mistral_export.cache_capacity": str(config.cache_capacity),
            # Whether the cache is a ring (a window) or linear (no window: a sequence must not pass the capacity,
            # which the graph cannot enforce; every consumer reads this and refuses, see op_contract.check_positions).
            "mistral_export.cache_wraps": str(int(config.sliding_window is not None)),
            "mistral_export.window": str(config.sliding_window or NO_WINDOW),
            "mistral_export.plugin_impl": plugin_impl,
            "mistral_export.last_token_logits": str(int(last_token_logits)),
            "mistral_export.dtype": str(dtype).removeprefix("torch."),
            **metadata,
        }
    )
    proto = ir.serde.serialize_model(traced)
    del proto.functions[:]
    proto.functions.extend(function_protos(opset))
    onnx.save(proto, str(model_path))
    log.info("checking %s (onnx.checker full check, strict shape inference)", MODEL_FILE)
    check_model(model_path)


def stored_dtype(checkpoint, fallback: torch.dtype) -> torch.dtype:
    from safetensors import safe_open

    path, key = next(iter(checkpoint.sources.values()))
    with safe_open(str(path), framework="pt") as handle:
        stored = handle.get_slice(key).get_dtype()
    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(stored, fallback)


def check_model(model_path: Path) -> None:
    """onnx.checker (full check, by path: external data is not loaded) and strict shape inference."""
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
        onnx.shape_inference.infer_shapes_path(
            str(model_path), str(model_path) + ".inferred", strict_mode=True, data_prop=True
        )
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise MistralExportError(f"{model_path}: exported graph fails the ONNX checker: {exc}") from None
    finally:
        Path(str(model_path) + ".inferred").unlink(missing_ok=True)


def read_export_config(model_path: str | Path) -> tuple[ModelConfig, dict[str, str]]:
    """The ModelConfig and metadata stored in an exported model.onnx (no weights loaded)."""
    from mistral_export.model.config import from_hf_config

    proto = onnx.load(str(model_path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if "mistral_export.config" not in meta:
        raise MistralExportError(f"{model_path}: not exported by mistral-export (no mistral_export.config metadata)")
    config = from_hf_config(Path(model_path), meta["mistral_export.config"])
    return config.replace(name=meta.get("mistral_export.model_name", "custom")), meta
