"""How the exporter writes the two `mistral::` torch ops into ONNX: one node each, domain `mistral`.

The model calls its torch ops (model/ops.py) and knows nothing of ONNX. At export, this module's
translation table maps each torch op to a node of the op contract (DESIGN.md) carrying
`plugin_namespace` (so TensorRT's parser binds it to our plugin) and `aot` (which of the plugin's two
implementations). The node's meaning for every other runtime is its function body (functions.py).

The ONNX schemas registered here are what lets onnxscript's tracer build the nodes (it looks every
op up by schema), and they let `onnx.checker` check the nodes' inputs and attributes too.
"""

from __future__ import annotations

import onnx
import torch
from onnx.defs import OpSchema
from onnxscript.values import Opset

from mistral_export.errors import MistralExportError
from mistral_export.op_contract import (
    ATTENTION_OP,
    CACHE_UPDATE_OP,
    DEFAULT_PLUGIN_IMPL,
    DOMAIN,
    PLUGIN_IMPLS,
    PLUGIN_NAMESPACE,
    VERSION,
)

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _param(name: str, type_str: str) -> OpSchema.FormalParameter:
    return OpSchema.FormalParameter(name, type_str, "")


def _attr(name: str, kind: OpSchema.AttrType, required: bool) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, kind, "", required=required)


_BINDING_ATTRS = [
    _attr("plugin_namespace", OpSchema.AttrType.STRING, False),
    _attr("aot", OpSchema.AttrType.INT, False),
]

SCHEMAS = (
    OpSchema(
        ATTENTION_OP,
        DOMAIN,
        VERSION,
        doc="Sliding-window GQA attention over [pre-update cache ∪ new keys] (DESIGN.md, op contract).",
        inputs=[
            _param("q", "T"),
            _param("k", "T"),
            _param("v", "T"),
            _param("k_cache", "T"),
            _param("v_cache", "T"),
            _param("past_len", "tensor(int64)"),
        ],
        outputs=[_param("out", "T")],
        type_constraints=[("T", _FLOATS, "I/O type; accumulation is fp32")],
        attributes=[
            _attr("window", OpSchema.AttrType.INT, True),
            _attr("scale", OpSchema.AttrType.FLOAT, True),
            *_BINDING_ATTRS,
        ],
    ),
    OpSchema(
        CACHE_UPDATE_OP,
        DOMAIN,
        VERSION,
        doc="Rolling cache update: slot (past_len + i) mod C <- new[:, :, i] for the last min(S, C) rows.",
        inputs=[_param("cache", "T"), _param("new", "T"), _param("past_len", "tensor(int64)"), _param("after", "T")],
        outputs=[_param("cache_out", "T")],
        type_constraints=[("T", _FLOATS, "cache type")],
        attributes=_BINDING_ATTRS,
    ),
)


def register_schemas() -> None:
    """Registers the contract's ONNX schemas with the onnx package, once per process."""
    for schema in SCHEMAS:
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)


def translation_table(plugin_impl: str = DEFAULT_PLUGIN_IMPL) -> dict:
    """torch op → onnxscript translation, for `torch.onnx.export(custom_translation_table=...)`."""
    if plugin_impl not in PLUGIN_IMPLS:
        raise MistralExportError(f"--plugin-impl must be one of {', '.join(PLUGIN_IMPLS)}, got '{plugin_impl}'")
    register_schemas()
    import mistral_export.model.ops  # noqa: F401  (defines the torch ops translated below)

    mistral = Opset(DOMAIN, VERSION)
    binding = {"plugin_namespace": PLUGIN_NAMESPACE, "aot": PLUGIN_IMPLS[plugin_impl]}

    def attention(q, k, v, k_cache, v_cache, past_len, window: int, scale: float):
        return mistral.SlidingWindowAttention(
            q, k, v, k_cache, v_cache, past_len, window=window, scale=scale, **binding
        )

    def cache_update(cache, new, past_len, after):
        return mistral.RollingCacheUpdate(cache, new, past_len, after, **binding)

    return {
        torch.ops.mistral.sliding_window_attention.default: attention,
        torch.ops.mistral.rolling_cache_update.default: cache_update,
    }
