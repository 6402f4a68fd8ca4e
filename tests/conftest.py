import os
from pathlib import Path

# Triton 3.9 warns that its FP-fusion default will change; the kernels are checked with fusion on.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest
import torch

from mistral_export.model.config import TINY_DIR, ModelConfig

TINY_AVAILABLE = (TINY_DIR / "model.safetensors").exists()
needs_tiny = pytest.mark.skipif(
    not TINY_AVAILABLE, reason="the tiny fixture has not been trained (tools/train_tiny.py)"
)

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_runtest_setup(item):
    """The one place the `tensorrt` and `gpu` markers become skips, each saying why (`-ra` lists them)."""
    from mistral_export.tensorrt_lib import unavailable_reason

    if item.get_closest_marker("tensorrt") and unavailable_reason():
        pytest.skip(f"tensorrt: {unavailable_reason()}")
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("gpu: no CUDA GPU visible to torch")


def small_config(
    head_dim=32, heads=4, kv_heads=4, window=16, layers=2, hidden=64, vocab=97, max_context=512, intermediate=96
):
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        sliding_window=window,
        max_context=max_context,
        rope_theta=10000.0,
        name=f"d{head_dim}-g{heads // kv_heads}-w{window}",
    )


@pytest.fixture
def tmp_model_dir(tmp_path: Path) -> Path:
    return tmp_path / "model"


def export_for_onnxruntime(model, out_dir, **options):
    """model.onnx and its ONNX Runtime artifact (what `mistral-export export` writes); returns model.onnx's path."""
    from mistral_export.engines.onnxruntime.artifact import write_onnxruntime_artifact
    from mistral_export.export.onnx_export import export_onnx

    path = export_onnx(model, out_dir, **options)
    write_onnxruntime_artifact(path)
    return path


def train_sentencepiece(path: Path, model_type: str = "bpe", vocab_size: int = 800) -> Path:
    """A SentencePiece model at PATH trained offline on standard-library source, with Mistral's options (byte
    fallback, digits split, no whitespace normalization); for native-checkpoint tokenizer tests."""
    import collections
    import inspect
    import json as json_module
    import pathlib

    import sentencepiece as spm

    text = path.with_suffix(".corpus.txt")
    parts = [inspect.getsource(m) for m in (collections, json_module, pathlib)]
    parts.append("Le café est très bon. Über naïve façade. 1 2 3 4 5 6 7 8 9 0.\n" * 20)
    text.write_text("\n".join(parts))
    prefix = path.with_suffix("")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(prefix),
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        max_sentence_length=1 << 16,
        minloglevel=2,
        num_threads=1,
    )
    text.unlink()
    prefix.with_suffix(".vocab").unlink()
    prefix.with_suffix(".model").replace(path)
    return path


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory) -> Path:
    """An fp32 ONNX Runtime build folder of the tiny fixture (pipeline/build.py), shared by the session."""
    if not TINY_AVAILABLE:
        pytest.skip("the tiny fixture has not been trained (tools/train_tiny.py)")
    from mistral_export.pipeline.build import build

    return build("tiny", tmp_path_factory.mktemp("tiny-build"))


@pytest.fixture(scope="module")
def tiny():
    from mistral_export.model.checkpoint import load_model

    return load_model("tiny")


@pytest.fixture(scope="module")
def held_out(tiny):
    """Held-out token ids and the fp32 eager logits over them (the precisions' reference)."""
    from mistral_export.runners.base import EagerRunner, prefill

    from helpers import CHUNK, held_out_ids

    ids = held_out_ids()
    eager = EagerRunner(tiny)
    eager.reset(ids.shape[0])
    return ids, prefill(eager, ids, CHUNK)
