"""What TensorRT did with the cache in a built engine, read from its engine inspector's layer information.

RollingCacheUpdate declares its output aliased to its cache input, and TensorRT's plugin header says it may insert
copies to honour the aliasing. A copy of a cache tensor per step would cost the whole cache (512 MiB per sequence for
Mistral 7B at C = 4096, fp16) each token, so the build records which layers copy one (artifact.json:
tensorrt.cache_copies) and validate reports them.

The engine information is TensorRT's JSON (IEngineInspector.get_engine_information(LayerInformationFormat.JSON),
engines built with ProfilingVerbosity.DETAILED): {"Layers": [{"Name", "LayerType", "Inputs": [{"Name", ...}],
"Outputs": [...], ...}], "Bindings": [...]}. Parsing it is plain Python (tested on CPU); reading it needs TensorRT.
"""

from __future__ import annotations

import json

from mistral_export.op_contract import cache_names

PLUGIN_LAYER_TYPES = ("PluginV3", "PluginV2")  # the mistral plugins' own layers: they read and write the cache


def cache_copies(engine_information: str | dict, layers: int) -> tuple[str, ...]:
    """Names of the layers, other than the plugins, that read or write a cache tensor (past_key_values.* or
    present.*): the copies TensorRT inserted. Raises ValueError where the information has no layer detail (an engine
    built without ProfilingVerbosity.DETAILED lists layer names only)."""
    document = json.loads(engine_information) if isinstance(engine_information, str) else engine_information
    cache = {name for pair in cache_names(layers) for name in pair}
    found = []
    for layer in document.get("Layers", []):
        if not isinstance(layer, dict):
            raise ValueError("the engine information lists layer names only; build with ProfilingVerbosity.DETAILED")
        if layer.get("LayerType") in PLUGIN_LAYER_TYPES:
            continue
        tensors = {t.get("Name") for t in layer.get("Inputs", []) + layer.get("Outputs", [])}
        if tensors & cache:
            found.append(layer.get("Name", "?"))
    return tuple(found)


def engine_cache_copies(engine, layers: int) -> tuple[str, ...]:
    """cache_copies of a built engine (a tensorrt.ICudaEngine built with ProfilingVerbosity.DETAILED)."""
    from mistral_export.tensorrt_lib import require_tensorrt

    trt = require_tensorrt("inspecting a TensorRT engine")
    inspector = engine.create_engine_inspector()
    return cache_copies(inspector.get_engine_information(trt.LayerInformationFormat.JSON), layers)
