"""artifact.json: the one typed description of an artifact, written by both backends' build stages and read by the
runners, validate, deploy and inspect.

    description = ArtifactDescription.read(folder)      # a clear error naming the file and the field at fault
    description.config, description.cache.capacity, description.io.inputs, description.tensorrt.gpu ...
    description.write(folder)                          # write-then-rename

The I/O comes from the graph the artifact was built from (names, element types, shapes with symbolic dims by
name), so consumers such as the deploy stage never restate it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mistral_export.artifacts.gpu import GpuDescription
from mistral_export.errors import MistralExportError
from mistral_export.files import read_json, write_json_atomic
from mistral_export.model.config import ModelConfig, from_hf_config

DESCRIPTION_FILE = "artifact.json"
DESCRIPTION_FORMAT = 2  # 2: typed, with io and last_token_logits
BACKENDS = ("onnxruntime", "tensorrt")
SOURCE_ONNX_KEY = "mistral_export.source_onnx_sha256"  # ONNX Runtime artifact metadata: the model.onnx it was made from


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy's name: float32, float16, int64
    shape: tuple[int | str, ...]  # a str is a symbolic dim (batch, sequence)


@dataclass(frozen=True)
class GraphIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True)
class CacheSpec:
    capacity: int
    window: int | None
    wraps: bool  # a ring (window) or a linear cache that must not overflow
    dtype: str

    @classmethod
    def of(cls, config: ModelConfig, dtype: str) -> CacheSpec:
        return cls(config.cache_capacity, config.sliding_window, config.sliding_window is not None, dtype)


@dataclass(frozen=True)
class OnnxRuntimeSection:
    file: str
    version: str
    providers: tuple[str, ...]
    own_data: str | None = None  # the artifact's own weights file (INT8); None: it shares model.onnx.data
    cache_in_place: bool = True  # present.* must be bound to the memory of past_key_values.* (GroupQueryAttention)


@dataclass(frozen=True)
class TensorRTSection:
    file: str
    version: str
    gpu: str
    gpu_slug: str
    compute_capability: str
    cuda_version: str | None
    plugins: str  # aot or jit
    profiles: tuple[dict, ...]  # input name -> {min, opt, max}
    options: dict  # the engine options that shape it (EngineOptions.key())
    strongly_typed: bool = True
    ptx_isa: str | None = None  # the AOT kernels' PTX ISA ("8.0"): the driver must accept it; None for JIT plugins
    # Layers TensorRT inserted that copy a cache tensor (engine inspector, engines/tensorrt/inspection.py): () when
    # none, so the cache is updated in place; None when the build did not inspect the engine.
    cache_copies: tuple[str, ...] | None = None

    @property
    def gpu_description(self) -> GpuDescription:
        return GpuDescription(self.gpu, self.compute_capability, self.version, self.cuda_version)

    @property
    def max_batch(self) -> int:
        return int(self.profiles[0]["input_ids"]["max"][0])

    @property
    def max_chunk(self) -> int:
        return int(self.profiles[0]["input_ids"]["max"][1])


@dataclass(frozen=True)
class ArtifactDescription:
    backend: str
    precision: str
    config: ModelConfig  # with the model's name
    cache: CacheSpec
    io: GraphIO
    onnx_sha256: str  # the portable model.onnx the artifact was made from
    last_token_logits: bool
    tool_version: str
    build_seconds: float
    onnxruntime: OnnxRuntimeSection | None = None
    tensorrt: TensorRTSection | None = None
    format: int = field(default=DESCRIPTION_FORMAT)

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.precision}" + (f"@{self.tensorrt.gpu_slug}" if self.tensorrt else "")

    @property
    def file(self) -> str:
        """The artifact's main file (model.ort.onnx, model.plan)."""
        return (self.onnxruntime or self.tensorrt).file

    def to_json(self) -> dict:
        document = {
            "format": self.format,
            "backend": self.backend,
            "precision": self.precision,
            "tool_version": self.tool_version,
            "model": {"name": self.config.name, "config": self.config.to_hf_dict()},
            "cache": asdict(self.cache),
            "io": {
                "inputs": [_spec_json(t) for t in self.io.inputs],
                "outputs": [_spec_json(t) for t in self.io.outputs],
            },
            "onnx_sha256": self.onnx_sha256,
            "last_token_logits": self.last_token_logits,
            "build_seconds": round(self.build_seconds, 2),
        }
        if self.onnxruntime:
            document["onnxruntime"] = {**asdict(self.onnxruntime), "providers": list(self.onnxruntime.providers)}
        if self.tensorrt:
            copies = self.tensorrt.cache_copies
            document["tensorrt"] = {
                **asdict(self.tensorrt),
                "profiles": list(self.tensorrt.profiles),
                "cache_copies": None if copies is None else list(copies),
            }
        return document

    @classmethod
    def from_json(cls, document: dict, where: Path | str) -> ArtifactDescription:
        if document.get("format") != DESCRIPTION_FORMAT or document.get("backend") not in BACKENDS:
            raise MistralExportError(
                f"{where}: not an engine description of this tool version (format "
                f"{DESCRIPTION_FORMAT}, backend {' or '.join(BACKENDS)}); rebuild with `mistral-export build`"
            )
        read = _Reader(document, where)
        backend = read("backend", str)
        model = read("model", dict)
        config = from_hf_config(Path(where), json.dumps(_Reader(model, where, "model.")("config", dict)))
        io = read("io", dict)
        section = read(backend, dict)
        return cls(
            backend=backend,
            precision=read("precision", str),
            config=config.replace(name=_Reader(model, where, "model.")("name", str)),
            cache=CacheSpec(**_fields(read("cache", dict), CacheSpec, where, "cache.")),
            io=GraphIO(
                *(
                    tuple(
                        TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))
                        for t in _Reader(io, where, "io.")(part, list)
                    )
                    for part in ("inputs", "outputs")
                )
            ),
            onnx_sha256=read("onnx_sha256", str),
            last_token_logits=read("last_token_logits", bool),
            tool_version=read("tool_version", str),
            build_seconds=float(read("build_seconds", (int, float))),
            onnxruntime=(
                OnnxRuntimeSection(
                    **{
                        **_fields(section, OnnxRuntimeSection, where, "onnxruntime."),
                        "providers": tuple(section["providers"]),
                    }
                )
                if backend == "onnxruntime"
                else None
            ),
            tensorrt=(
                TensorRTSection(
                    **{
                        **_fields(section, TensorRTSection, where, "tensorrt."),
                        "profiles": tuple(section["profiles"]),
                        "cache_copies": (
                            None if section.get("cache_copies") is None else tuple(section["cache_copies"])
                        ),
                    }
                )
                if backend == "tensorrt"
                else None
            ),
        )

    @classmethod
    def read(cls, folder: Path) -> ArtifactDescription:
        path = Path(folder) / DESCRIPTION_FILE
        return cls.from_json(read_json(path, DESCRIPTION_FILE), path)

    def write(self, folder: Path) -> Path:
        path = Path(folder) / DESCRIPTION_FILE
        write_json_atomic(path, self.to_json())
        return path


def _spec_json(spec: TensorSpec) -> dict:
    return {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape)}


class _Reader:
    """document[key] of the expected type, or an error naming the file and the field."""

    def __init__(self, document: dict, where: Path | str, prefix: str = ""):
        self.document, self.where, self.prefix = document, where, prefix

    def __call__(self, key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in self.document:
            raise MistralExportError(f"{self.where}: no '{self.prefix}{key}' field")
        value = self.document[key]
        if not isinstance(value, kind):
            raise MistralExportError(f"{self.where}: '{self.prefix}{key}' has the wrong type ({type(value).__name__})")
        return value


def _fields(document: dict, kind: type, where: Path | str, prefix: str) -> dict:
    """The dataclass KIND's fields out of DOCUMENT (unknown keys ignored, missing required ones named)."""
    from dataclasses import MISSING, fields

    values = {}
    for f in fields(kind):
        if f.name in document:
            values[f.name] = document[f.name]
        elif f.default is MISSING:
            raise MistralExportError(f"{where}: no '{prefix}{f.name}' field")
    return values
