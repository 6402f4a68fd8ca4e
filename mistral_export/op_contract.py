"""Identity of the two `mistral` ops (DESIGN.md, "The op contract"): names, domain, attributes, limits.

One small module below model, export and plugins, so each reads the same names: the torch reference
registers the torch ops under these names, the exporter writes ONNX nodes of these types, and the
TensorRT plugins register under the same namespace so the parser binds the nodes to them.
"""

from __future__ import annotations

DOMAIN = "mistral"  # ONNX domain of the nodes and of their function bodies
VERSION = 1
PLUGIN_NAMESPACE = "mistral"  # node attribute TensorRT's parser uses to bind a node to a registered plugin

ATTENTION_OP = "SlidingWindowAttention"
CACHE_UPDATE_OP = "RollingCacheUpdate"

# torch.library names (namespace `mistral`): attention, the in-place update the eager model uses, and the
# functional update (with the ordering input `after`) that a traced graph uses.
TORCH_ATTENTION = "mistral::sliding_window_attention"
TORCH_CACHE_UPDATE_INPLACE = "mistral::rolling_cache_update_"
TORCH_CACHE_UPDATE = "mistral::rolling_cache_update"

# The `window` attribute's one encoding of "no window": every earlier position is attended.
NO_WINDOW = 0

# Node attribute `aot`: which of the two registered TensorRT implementations binds (1 ahead-of-time, 0 JIT).
PLUGIN_IMPLS = {"aot": 1, "jit": 0}
DEFAULT_PLUGIN_IMPL = "aot"

# The last position a sequence may reach. Rotary angles are computed from positions cast to fp32 (in the eager
# model and the exported graph, as Hugging Face does), which holds every integer exactly only up to 2^24: past
# that, neighbouring positions would get the same rotation. (The kernels rebase int64 positions, so they set no
# lower limit.) Every runner refuses a step that would go past it.
MAX_POSITION = 2**24 - 1

# Graph I/O of the cache (DESIGN.md, "Graph I/O"; names as Optimum and onnxruntime-genai spell them).
CACHE_KINDS = ("key", "value")


def cache_input(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def cache_output(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def cache_names(num_layers: int) -> list[tuple[str, str]]:
    """(input, output) name of every layer's key and value cache, in graph order."""
    return [(cache_input(i, kind), cache_output(i, kind)) for i in range(num_layers) for kind in CACHE_KINDS]


def check_positions(past_len: list[int], seq: int, capacity: int, wraps: bool) -> None:
    """The contract's limits on a step of `seq` tokens at positions past_len[b] + i, for every consumer.

    A graph or a kernel cannot raise, so each runner (and the deploy stage) calls this before a step:
    without a window (`wraps` False) the cache is linear and a sequence must not pass its capacity (it
    would wrap silently); with one, positions must stay exact in the fp32 rotary embedding (MAX_POSITION).
    """
    from mistral_export.errors import MistralExportError

    if not past_len:
        return
    if min(past_len) < 0:
        raise MistralExportError(f"past_len must be >= 0, got {past_len}")
    end = max(past_len) + seq  # tokens the longest sequence holds after this step
    if not wraps and end > capacity:
        raise MistralExportError(
            f"sequence of {end} tokens exceeds the cache capacity {capacity} of a model without sliding window "
            f"(max context); shorten the prompt or --max-new-tokens"
        )
    if end - 1 > MAX_POSITION:
        raise MistralExportError(
            f"position {end - 1} is past the last position rotary embeddings compute exactly ({MAX_POSITION} = "
            f"2^24 - 1, fp32); start a new sequence"
        )
