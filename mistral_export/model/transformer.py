"""The eager reference model: RMSNorm, RoPE (rotate-half layout), GQA with a sliding window, SwiGLU.

Attention and the cache update go through the two `mistral::` ops (ops.py), so the same model
runs on their torch reference, on CUDA kernels registered for them, and traces to ONNX nodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mistral_export.model import ops
from mistral_export.model.config import ModelConfig
from mistral_export.op_contract import check_positions

KVCache = list[tuple[Tensor, Tensor]]  # per layer (keys, values), each [B, Hkv, C, D]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        # x / sqrt(.) rather than x * rsqrt(.): the form ONNX Runtime fuses into one SimplifiedLayerNormalization.
        x32 = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_inv_freq(config: ModelConfig, device: torch.device | str = "cpu") -> Tensor:
    """RoPE frequencies theta^(-2i/D), fp32, [D/2]."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float32, device=device) / config.head_dim
    return 1.0 / (config.rope_theta**exponents)


def rotary_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sign-folded sin [B, 1, S, D] for absolute positions [B, S], computed in fp32 once for all layers.

    The rotate-half sign lives in sin ([-sin, sin]), so each layer swaps halves without a negation.
    """
    freqs = (positions.float().unsqueeze(-1) * inv_freq).unsqueeze(1)  # [B,1,S,D/2]
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], -1).to(dtype), torch.cat([-sin, sin], -1).to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return x * cos + swapped * signed_sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        h, d = config.hidden_size, config.head_dim
        self.wq = nn.Linear(h, config.num_heads * d, bias=False)
        self.wk = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.wv = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.wo = nn.Linear(config.num_heads * d, h, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past_len: Tensor, cache: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        c = self.config
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        window = c.sliding_window or ops.NO_WINDOW
        scale = c.head_dim**-0.5
        if cache is None:
            # Training and scoring: whole sequences, no cache, differentiable reference.
            empty = k.new_zeros(batch, c.num_kv_heads, 0, c.head_dim)
            out = ops.sliding_window_attention_reference(q, k, v, empty, empty, past_len, window, scale)
            return self.wo(out.transpose(1, 2).reshape(batch, seq, -1)), None
        k_cache, v_cache = cache
        out = torch.ops.mistral.sliding_window_attention(q, k, v, k_cache, v_cache, past_len, window, scale)
        if torch.compiler.is_exporting():
            # A traced graph holds no in-place state: the updated caches are new values, ordered after the
            # attention that reads the old ones (a chunk longer than W needs the keys it evicts).
            present = (
                torch.ops.mistral.rolling_cache_update(k_cache, k, past_len, out),
                torch.ops.mistral.rolling_cache_update(v_cache, v, past_len, out),
            )
        else:
            torch.ops.mistral.rolling_cache_update_(k_cache, k, past_len)
            torch.ops.mistral.rolling_cache_update_(v_cache, v, past_len)
            present = cache
        out = out.transpose(1, 2).reshape(batch, seq, c.num_heads * c.head_dim)
        return self.wo(out), present


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # gate
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)  # down
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, past_len, cache):
        attended, present = self.attention(self.attention_norm(x), cos, sin, past_len, cache)
        x = x + attended
        return x + self.feed_forward(self.ffn_norm(x)), present


class Transformer(nn.Module):
    """State-dict names follow the native layout; wq/wk rows are in rotate-half (HF) order."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rotary_inv_freq(config), persistent=False)

    def forward(
        self,
        input_ids: Tensor,
        past_len: Tensor | None = None,
        cache: KVCache | None = None,
        last_token_logits: bool = False,
    ) -> tuple[Tensor, KVCache | None]:
        """Logits [B,S,V] (or [B,1,V]) and the cache after this chunk.

        Sequence b's token i sits at absolute position past_len[b] + i. Without a cache the
        whole sequence is attended at once (training, scoring).
        """
        batch, seq = input_ids.shape
        if past_len is None:
            past_len = torch.zeros(batch, dtype=torch.int64, device=input_ids.device)
        if cache is not None and not torch.compiler.is_exporting():
            check_positions(past_len.tolist(), seq, self.config.cache_capacity, self.config.sliding_window is not None)
        positions = past_len.unsqueeze(1) + torch.arange(seq, device=input_ids.device)
        x = self.tok_embeddings(input_ids)
        cos, sin = rotary_cos_sin(positions, self.inv_freq, x.dtype)
        presents: KVCache = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, cos, sin, past_len, None if cache is None else cache[i])
            presents.append(present)
        if last_token_logits:
            x = x[:, -1:]
        logits = self.output(self.norm(x))
        return logits, (presents if cache is not None else None)


def allocate_cache(
    config: ModelConfig, batch: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> KVCache:
    """Zeroed rolling cache: per layer keys and values of [B, Hkv, C, D], C = config.cache_capacity."""
    shape = (batch, config.num_kv_heads, config.cache_capacity, config.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(config.num_layers)
    ]
