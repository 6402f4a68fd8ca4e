"""What `mistral-export inspect` reports: shapes, parameter count, weight and KV-cache bytes."""

from __future__ import annotations

from mistral_export.model.config import ModelConfig

WEIGHT_DTYPES = {"fp32": 4, "fp16/bf16": 2, "int8": 1}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def describe(config: ModelConfig, context: int) -> list[tuple[str, str]]:
    window = str(config.sliding_window) if config.sliding_window else "none (linear cache up to max context)"
    params = config.parameter_count()
    rows = [
        ("model", config.name),
        ("layers / hidden / intermediate", f"{config.num_layers} / {config.hidden_size} / {config.intermediate_size}"),
        ("query heads / KV heads / head_dim", f"{config.num_heads} / {config.num_kv_heads} / {config.head_dim}"),
        ("vocabulary", str(config.vocab_size)),
        ("sliding window", window),
        ("cache capacity C (slots per layer)", str(config.cache_capacity)),
        ("max context", str(config.max_context)),
        ("rope theta / rms eps", f"{config.rope_theta:g} / {config.rms_norm_eps:g}"),
        ("parameters", f"{params:,}"),
    ]
    rows += [(f"weights {name}", human_bytes(params * size)) for name, size in WEIGHT_DTYPES.items()]
    full = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2  # fp16 K+V per token
    rows += [
        ("KV cache per token (fp16)", human_bytes(full)),
        ("KV cache per sequence, full cache (fp16)", human_bytes(config.kv_cache_bytes(config.cache_capacity))),
        (f"KV cache per sequence at {context} tokens (fp16)", human_bytes(config.kv_cache_bytes(context))),
    ]
    if config.sliding_window is None and context > config.cache_capacity:
        rows.append(("note", f"{context} tokens exceed this model's max context {config.max_context}"))
    return rows
