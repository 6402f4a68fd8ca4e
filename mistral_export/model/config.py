"""One model configuration, filled from a Hugging Face config.json, a native params.json, or a preset."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from mistral_export.errors import MistralExportError

TINY_DIR = Path(__file__).parent / "fixtures" / "tiny"
DEFAULT_MAX_CONTEXT = 32768


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None  # None: no window (v0.2/v0.3), the cache is linear up to max_context
    max_context: int = DEFAULT_MAX_CONTEXT
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    name: str = "custom"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def cache_capacity(self) -> int:
        """C in the op contract: the window when there is one, else the maximum context."""
        return self.sliding_window if self.sliding_window is not None else self.max_context

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise MistralExportError(f"invalid model config ({self.name}): {msg}")

        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_context",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"{field} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            fail(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            fail(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None:
            if not isinstance(self.sliding_window, int) or self.sliding_window <= 0:
                fail(f"sliding_window must be a positive integer or absent, got {self.sliding_window!r}")
        if self.rope_theta <= 0:
            fail(f"rope_theta must be positive, got {self.rope_theta}")
        if self.rms_norm_eps <= 0:
            fail(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")

    def parameter_count(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attention = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h
        return self.num_layers * per_layer + 2 * self.vocab_size * h + h

    def kv_cache_bytes(self, context: int, bytes_per_element: int = 2) -> int:
        """Bytes of K and V cache for one sequence of `context` tokens (bounded by the capacity)."""
        slots = min(context, self.cache_capacity)
        return 2 * self.num_layers * self.num_kv_heads * slots * self.head_dim * bytes_per_element

    def to_hf_dict(self) -> dict:
        return {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_context,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
        }

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _read_json(path: Path, text: str | None = None) -> dict:
    try:
        data = json.loads(path.read_text() if text is None else text)
    except json.JSONDecodeError as exc:
        raise MistralExportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MistralExportError(f"{path}: expected a JSON object")
    return data


def _require(data: dict, key: str, path: Path):
    if key not in data:
        raise MistralExportError(f"{path}: missing required field '{key}'")
    return data[key]


def from_hf_config(path: Path, text: str | None = None) -> ModelConfig:
    """The Hugging Face config.json at `path`, or `text` holding its contents (an exported model's metadata);
    errors name `path`."""
    data = _read_json(path, text)
    model_type = data.get("model_type", "mistral")
    if model_type != "mistral":
        raise MistralExportError(f"{path}: model_type is '{model_type}', expected 'mistral'")
    if data.get("tie_word_embeddings"):
        raise MistralExportError(f"{path}: tie_word_embeddings=true is not a Mistral layout")
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise MistralExportError(f"{path}: hidden_act is '{act}', expected 'silu'")
    hidden = _require(data, "hidden_size", path)
    heads = _require(data, "num_attention_heads", path)
    rope_theta = data.get("rope_theta")
    if rope_theta is None:  # transformers 5 nests it under rope_parameters
        rope_theta = (data.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        vocab_size=_require(data, "vocab_size", path),
        hidden_size=hidden,
        intermediate_size=_require(data, "intermediate_size", path),
        num_layers=_require(data, "num_hidden_layers", path),
        num_heads=heads,
        num_kv_heads=data.get("num_key_value_heads") or heads,
        head_dim=data.get("head_dim") or hidden // heads,
        sliding_window=data.get("sliding_window"),
        max_context=data.get("max_position_embeddings", DEFAULT_MAX_CONTEXT),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(data.get("rms_norm_eps", 1e-5)),
        name=path.parent.name,
    )


def from_native_params(path: Path) -> ModelConfig:
    data = _read_json(path)
    dim = _require(data, "dim", path)
    heads = _require(data, "n_heads", path)
    return ModelConfig(
        vocab_size=_require(data, "vocab_size", path),
        hidden_size=dim,
        intermediate_size=_require(data, "hidden_dim", path),
        num_layers=_require(data, "n_layers", path),
        num_heads=heads,
        num_kv_heads=data.get("n_kv_heads") or heads,
        head_dim=data.get("head_dim") or dim // heads,
        sliding_window=data.get("sliding_window"),
        max_context=data.get("max_seq_len", DEFAULT_MAX_CONTEXT),
        rope_theta=float(data.get("rope_theta", 10000.0)),
        rms_norm_eps=float(data.get("norm_eps", 1e-5)),
        name=path.parent.name,
    )


_MISTRAL_7B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    max_context=32768,
    rms_norm_eps=1e-5,
)

PRESETS: dict[str, dict] = {
    "mistral-7b-v0.1": dict(_MISTRAL_7B, vocab_size=32000, sliding_window=4096, rope_theta=10000.0),
    "mistral-7b-v0.3": dict(_MISTRAL_7B, vocab_size=32768, sliding_window=None, rope_theta=1e6),
}


def preset_names() -> list[str]:
    return ["tiny", *PRESETS]


def load_config(model: str | Path) -> ModelConfig:
    """Config for MODEL: a preset name, or a folder with config.json (HF) or params.json (native)."""
    if str(model) == "tiny":
        return from_hf_config(TINY_DIR / "config.json").replace(name="tiny")
    if str(model) in PRESETS:
        return ModelConfig(name=str(model), **PRESETS[str(model)])
    folder = Path(model)
    if not folder.exists():
        raise MistralExportError(
            f"model '{model}' is neither a folder nor a preset (presets: {', '.join(preset_names())})"
        )
    if folder.is_file():
        raise MistralExportError(f"{folder}: expected a model folder (config.json or params.json inside), got a file")
    if (folder / "config.json").exists():
        return from_hf_config(folder / "config.json")
    if (folder / "params.json").exists():
        return from_native_params(folder / "params.json")
    raise MistralExportError(f"{folder}: no config.json (Hugging Face) or params.json (native) found")


def resolve_model_dir(model: str | Path) -> Path | None:
    """Folder holding MODEL's weights, or None for a shape-only preset."""
    if str(model) == "tiny":
        return TINY_DIR
    if str(model) in PRESETS:
        return None
    return Path(model)
