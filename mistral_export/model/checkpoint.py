"""Lazy safetensors checkpoint loading, Hugging Face and native (mistral-inference) layouts.

Tensors are read one at a time through safetensors' mmap and cast to the target dtype as they
are placed into a model built on the meta device, so loading never holds two copies of the weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from mistral_export.errors import MistralExportError
from mistral_export.files import written_atomically
from mistral_export.model.config import ModelConfig, load_config, resolve_model_dir
from mistral_export.model.transformer import Transformer, rotary_inv_freq

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")

_HF_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def hf_to_internal(name: str) -> str | None:
    if name in _HF_TOP:
        return _HF_TOP[name]
    match = _HF_LAYER_RE.match(name)
    if match and match.group(2) in _HF_LAYER:
        return f"layers.{match.group(1)}.{_HF_LAYER[match.group(2)]}.weight"
    return None


def internal_to_hf(name: str) -> str:
    for hf, ours in _HF_TOP.items():
        if ours == name:
            return hf
    layer, rest = name.split(".", 2)[1:]
    module = rest.removesuffix(".weight")
    hf = next(k for k, v in _HF_LAYER.items() if v == module)
    return f"model.layers.{layer}.{hf}.weight"


def interleaved_to_rotate_half(weight: Tensor, heads: int) -> Tensor:
    """Reorder q/k projection rows from native interleaved RoPE pairs to HF's rotate-half halves."""
    rows, cols = weight.shape
    head_dim = rows // heads
    return weight.view(heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rotate_half_to_interleaved(weight: Tensor, heads: int) -> Tensor:
    rows, cols = weight.shape
    head_dim = rows // heads
    return weight.view(heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (single, or shards listed by an index)."""
    for index_name in ("model.safetensors.index.json", "consolidated.safetensors.index.json"):
        index = folder / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise MistralExportError(f"{index}: not a valid safetensors index ({exc})") from None
            files = sorted({folder / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise MistralExportError(f"{index}: lists shard {f.name}, which is missing")
            return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise MistralExportError(
            f"{folder}: only pickle checkpoints found ({', '.join(pickles)}); they can run arbitrary code and are "
            "not loaded. Convert them to safetensors first (e.g. transformers' save_pretrained(safe_serialization=True))"
        )
    raise MistralExportError(f"{folder}: no *.safetensors weights found")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise MistralExportError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from None


class Checkpoint:
    """Name → (file, source name) index over a checkpoint's safetensors files; reads lazily."""

    def __init__(self, folder: Path, config: ModelConfig):
        self.folder = folder
        self.config = config
        self.files = find_weight_files(folder)
        self.expected = parameter_shapes(config)
        self.sources: dict[str, tuple[Path, str]] = {}
        source_names: list[tuple[Path, str]] = []
        for path in self.files:
            with _open(path) as handle:
                source_names += [(path, key) for key in handle.keys()]
        self.native = any(key == "tok_embeddings.weight" for _, key in source_names)
        unexpected = []
        for path, key in source_names:
            name = key if self.native else hf_to_internal(key)
            if self.native and key not in self.expected:
                name = None
            if name is None:
                unexpected.append(f"{key} (in {path.name})")
            else:
                self.sources[name] = (path, key)
        if unexpected:
            raise MistralExportError(
                f"{folder}: unexpected tensors: {', '.join(unexpected[:5])}"
                + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
            )
        missing = [n for n in self.expected if n not in self.sources]
        if missing:
            shown = [internal_to_hf(n) if not self.native else n for n in missing[:5]]
            raise MistralExportError(
                f"{folder}: missing tensors: {', '.join(shown)}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
        """(internal name, tensor) pairs in checkpoint order, one tensor in memory at a time (each read through its
        own opening of the file: pages of a shard already read do not stay mapped, and counted, while it is read)."""
        order = {path: i for i, path in enumerate(self.files)}
        for name in sorted(self.sources, key=lambda n: order.get(self.sources[n][0], 0)):
            yield name, self.tensor(name, dtype)

    def tensor(self, name: str, dtype: torch.dtype) -> Tensor:
        """One tensor by internal name (its file opened and closed again: no mapping of a whole shard stays)."""
        path, key = self.sources[name]
        with _open(path) as handle:
            return self._read(handle, path, name, key).to(dtype)

    def _read(self, handle, path: Path, name: str, key: str) -> Tensor:
        try:
            tensor = handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise MistralExportError(f"{path}: cannot read tensor '{key}': {exc}") from None
        if tuple(tensor.shape) != self.expected[name]:
            raise MistralExportError(
                f"{path}: tensor '{key}' has shape {list(tensor.shape)}, expected "
                f"{list(self.expected[name])} from the config ({self.config.name})"
            )
        if self.native and name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = self.config.num_heads if ".wq." in name else self.config.num_kv_heads
            tensor = interleaved_to_rotate_half(tensor, heads)
        return tensor


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Internal parameter name → shape for CONFIG (from a meta-device model: no memory)."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def load_model(model: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Transformer:
    """The eager model with MODEL's weights (a folder or `tiny`), loaded tensor by tensor."""
    config = load_config(model)
    folder = resolve_model_dir(model)
    if folder is None:
        raise MistralExportError(f"preset '{model}' has shapes only, no weights; pass a checkpoint folder")
    checkpoint = Checkpoint(folder, config)
    with torch.device("meta"):
        result = Transformer(config)
    for name, tensor in checkpoint.tensors(dtype):
        module_name, _, attr = name.rpartition(".")
        module = result.get_submodule(module_name)
        module._parameters[attr] = torch.nn.Parameter(tensor.to(device), requires_grad=False)
    result.inv_freq = rotary_inv_freq(config, device)
    return result.eval()


def random_model(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    """A model with small random weights, for tests and benchmarks of shapes that ship no checkpoint."""
    generator = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * param.shape[-1] ** -0.5)
    return model.to(dtype).eval()


def save_hf_checkpoint(model: Transformer, folder: Path, dtype: torch.dtype | None = None) -> None:
    """Write config.json and model.safetensors in Hugging Face layout."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        internal_to_hf(name): (p.detach().to(dtype) if dtype else p.detach()).contiguous()
        for name, p in model.named_parameters()
    }
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    with written_atomically(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
