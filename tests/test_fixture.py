"""The embedded `tiny` model: real trained weights and tokenizer, small enough to ship."""

import math

import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from mistral_export.cli import app
from mistral_export.model.checkpoint import load_model
from mistral_export.model.config import TINY_DIR, load_config
from mistral_export.model.tokenizer import load_tokenizer

from conftest import needs_tiny

pytestmark = needs_tiny

HELD_OUT_SAMPLE = '''
def parse_header(line, sep=":"):
    """Split a header line into a name and a stripped value."""
    name, _, value = line.partition(sep)
    if not name:
        raise ValueError("empty header name: %r" % (line,))
    return name.strip().lower(), value.strip()


class Registry:
    def __init__(self):
        self._items = {}

    def register(self, key, value):
        if key in self._items:
            raise KeyError(key)
        self._items[key] = value
        return value
'''


def test_fixture_is_small_and_shaped_as_documented():
    size = sum(p.stat().st_size for p in TINY_DIR.iterdir())
    assert size <= 10 * 2**20
    config = load_config("tiny")
    assert config.sliding_window == 64 and config.num_heads // config.num_kv_heads == 4
    assert load_tokenizer(TINY_DIR).vocab_size == config.vocab_size <= 4096


def test_tokenizer_round_trips_code():
    tokenizer = load_tokenizer(TINY_DIR)
    ids = tokenizer.encode(HELD_OUT_SAMPLE)
    assert ids[0] == tokenizer.bos_id
    assert len(ids) < len(HELD_OUT_SAMPLE) / 2  # BPE learned merges for code
    assert tokenizer.decode(ids) == HELD_OUT_SAMPLE


def test_model_predicts_unseen_code_far_better_than_uniform():
    tokenizer, model = load_tokenizer(TINY_DIR), load_model("tiny")
    ids = torch.tensor([tokenizer.encode(HELD_OUT_SAMPLE)])
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
    perplexity = math.exp(F.cross_entropy(logits[0], ids[0, 1:]).item())
    assert perplexity < model.config.vocab_size / 20, perplexity


def test_generate_streams_code_like_text():
    result = CliRunner().invoke(
        app, ["generate", "tiny", "--prompt", "    def __init__(self", "--max-new-tokens", "48", "--chunk-size", "3"]
    )
    assert result.exit_code == 0, result.output
    continuation = result.stdout.removeprefix("    def __init__(self")
    assert len(continuation.strip()) > 40
    printable = sum(ch.isascii() and (ch.isprintable() or ch in "\n\t") for ch in continuation)
    assert printable / len(continuation) > 0.95
    assert any(word in continuation for word in ("self.", "return", "None", "):"))
