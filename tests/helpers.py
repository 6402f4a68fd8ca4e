"""Helpers several test modules share (tests import from here or conftest, never from another test module)."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from mistral_export.model.checkpoint import load_model, rotate_half_to_interleaved
from mistral_export.model.config import TINY_DIR
from mistral_export.model.tokenizer import load_tokenizer
from mistral_export.runners.base import EagerRunner, greedy_tokens, prefill

PROMPTS = [
    "def read_config(path):",
    "import os\n",
    "class Parser:\n    def __init__(self",
    "for i in range(",
    "return self.",
    "    if not os.path.exists(",
    "# Copyright",
    "def __repr__(self):\n        return",
]


@functools.cache
def eager_text(prompt: str, max_tokens: int) -> str:
    """The eager model's greedy continuation (the reference), on one thread: the tiny model gains nothing
    from two, and two threads slow to a crawl when other jobs share the cores."""
    tokenizer = load_tokenizer(TINY_DIR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = EagerRunner(load_model("tiny"))
        return tokenizer.decode(
            list(greedy_tokens(runner, tokenizer.encode(prompt), max_tokens, stop_id=tokenizer.eos_id))
        )
    finally:
        torch.set_num_threads(threads)


def write_native(hf_folder: Path, out: Path) -> None:
    """Convert an HF-layout checkpoint to mistral-inference's native layout (params.json + consolidated)."""
    config = json.loads((hf_folder / "config.json").read_text())
    tensors = {}
    with safe_open(str(hf_folder / "model.safetensors"), "pt") as f:
        for key in f.keys():
            name = {
                "model.embed_tokens.weight": "tok_embeddings.weight",
                "model.norm.weight": "norm.weight",
                "lm_head.weight": "output.weight",
            }.get(key)
            tensor = f.get_tensor(key)
            if name is None:
                layer = key.split(".")[2]
                part = key.split(".", 3)[3].removesuffix(".weight")
                name = (
                    f"layers.{layer}."
                    + {
                        "self_attn.q_proj": "attention.wq",
                        "self_attn.k_proj": "attention.wk",
                        "self_attn.v_proj": "attention.wv",
                        "self_attn.o_proj": "attention.wo",
                        "mlp.gate_proj": "feed_forward.w1",
                        "mlp.down_proj": "feed_forward.w2",
                        "mlp.up_proj": "feed_forward.w3",
                        "input_layernorm": "attention_norm",
                        "post_attention_layernorm": "ffn_norm",
                    }[part]
                    + ".weight"
                )
                if part == "self_attn.q_proj":
                    tensor = rotate_half_to_interleaved(tensor, config["num_attention_heads"])
                if part == "self_attn.k_proj":
                    tensor = rotate_half_to_interleaved(tensor, config["num_key_value_heads"])
            tensors[name] = tensor.contiguous()
    out.mkdir(parents=True)
    save_file(tensors, str(out / "consolidated.safetensors"))
    params = {
        "dim": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "head_dim": config["head_dim"],
        "hidden_dim": config["intermediate_size"],
        "n_heads": config["num_attention_heads"],
        "n_kv_heads": config["num_key_value_heads"],
        "norm_eps": config["rms_norm_eps"],
        "sliding_window": config["sliding_window"],
        "vocab_size": config["vocab_size"],
        "rope_theta": config["rope_theta"],
    }
    (out / "params.json").write_text(json.dumps(params))


# The precisions' quality checks on held-out text (test_precision*.py, test_layerwise_calibration.py).
CHUNK = 64  # prefill chunk of the held-out text: the window of `tiny`
ROOT = Path(__file__).resolve().parents[1]


def held_out_ids(files: int = 3, length: int = 384) -> torch.Tensor:
    """Token ids of files the tiny fixture never saw in training (each 10th stdlib file, as tools/train_tiny.py)."""
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "tools" / "train_tiny.py")
    train_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tiny)
    held = [f for i, f in enumerate(train_tiny.stdlib_files()) if i % train_tiny.HELD_OUT_EVERY == 0]
    tokenizer = load_tokenizer(TINY_DIR)
    rows = [
        ids[:length] for ids in (tokenizer.encode(f.read_text(errors="replace")) for f in held) if len(ids) >= length
    ]
    return torch.tensor(rows[:files])


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(torch.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())))


def score(runner, reference, ids) -> dict:
    """Top-1 agreement with the reference logits and perplexity ratio over held-out text."""
    runner.reset(ids.shape[0])
    logits = prefill(runner, ids, CHUNK)
    return {
        "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
        "perplexity_ratio": perplexity(logits, ids) / perplexity(reference, ids),
    }


def outlier_model(model, channels: int = 4, factor: float = 40.0):
    """MODEL with activation outliers: a few channels of every norm's output scaled up, the weights reading them
    scaled down by the same factor, so the fp32 function is unchanged."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.layers:
            for norm, consumers in (
                (block.attention_norm, (block.attention.wq, block.attention.wk, block.attention.wv)),
                (block.ffn_norm, (block.feed_forward.w1, block.feed_forward.w3)),
            ):
                picked = torch.randperm(norm.weight.numel(), generator=generator)[:channels]
                norm.weight[picked] *= factor
                for linear in consumers:
                    linear.weight[:, picked] /= factor
    return model
