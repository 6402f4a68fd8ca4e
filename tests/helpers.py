"""Helpers several test modules share (tests import from here or conftest, never from another test module)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mistral_export.model.checkpoint import load_model, rotate_half_to_interleaved
from mistral_export.model.config import TINY_DIR
from mistral_export.model.tokenizer import load_tokenizer
from mistral_export.runners.base import EagerRunner, greedy_tokens

PROMPTS = ["def read_config(path):", "import os\n", "class Parser:\n    def __init__(self", "for i in range(",
           "return self.", "    if not os.path.exists(", "# Copyright", "def __repr__(self):\n        return"]


@functools.cache
def eager_text(prompt: str, max_tokens: int) -> str:
    """The eager model's greedy continuation (the reference), on one thread: the tiny model gains nothing
    from two, and two threads slow to a crawl when other jobs share the cores."""
    tokenizer = load_tokenizer(TINY_DIR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = EagerRunner(load_model("tiny"))
        return tokenizer.decode(list(greedy_tokens(runner, tokenizer.encode(prompt), max_tokens,
                                                   stop_id=tokenizer.eos_id)))
    finally:
        torch.set_num_threads(threads)


def write_native(hf_folder: Path, out: Path) -> None:
    """Convert an HF-layout checkpoint to mistral-inference's native layout (params.json + consolidated)."""
    config = json.loads((hf_folder / "config.json").read_text())
    tensors = {}
    with safe_open(str(hf_folder / "model.safetensors"), "pt") as f:
        for key in f.keys():
            name = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                    "lm_head.weight": "output.weight"}.get(key)
            tensor = f.get_tensor(key)
            if name is None:
                layer = key.split(".")[2]
                part = key.split(".", 3)[3].removesuffix(".weight")
                name = f"layers.{layer}." + {
                    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                    "post_attention_layernorm": "ffn_norm"}[part] + ".weight"
                if part == "self_attn.q_proj":
                    tensor = rotate_half_to_interleaved(tensor, config["num_attention_heads"])
                if part == "self_attn.k_proj":
                    tensor = rotate_half_to_interleaved(tensor, config["num_key_value_heads"])
            tensors[name] = tensor.contiguous()
    out.mkdir(parents=True)
    save_file(tensors, str(out / "consolidated.safetensors"))
    params = {"dim": config["hidden_size"], "n_layers": config["num_hidden_layers"], "head_dim": config["head_dim"],
              "hidden_dim": config["intermediate_size"], "n_heads": config["num_attention_heads"],
              "n_kv_heads": config["num_key_value_heads"], "norm_eps": config["rms_norm_eps"],
              "sliding_window": config["sliding_window"], "vocab_size": config["vocab_size"],
              "rope_theta": config["rope_theta"]}
    (out / "params.json").write_text(json.dumps(params))
