"""`mistral-export generate` as a new user first types it: --build picks its backend, a window-less model asked for
more than its cache is refused before anything is printed, an error after streamed text starts on its own line,
and a build folder given to --onnx is named as one."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from mistral_export.cli import _stream, app
from mistral_export.errors import MistralExportError
from mistral_export.model.checkpoint import load_model, random_model, save_hf_checkpoint
from mistral_export.model.config import TINY_DIR
from mistral_export.model.tokenizer import load_tokenizer
from mistral_export.runners.base import EagerRunner

from conftest import needs_tiny, small_config
from helpers import PROMPTS, eager_text

CAPACITY = 48


@pytest.fixture(scope="module")
def windowless_checkpoint(tmp_path_factory):
    """A 2-layer checkpoint without sliding window, a linear cache of 48 slots, with the tiny fixture's tokenizer."""
    folder = tmp_path_factory.mktemp("windowless")
    save_hf_checkpoint(random_model(small_config(vocab=2048, window=None, max_context=CAPACITY), seed=1), folder)
    shutil.copy(TINY_DIR / "tokenizer.json", folder / "tokenizer.json")
    return folder


@needs_tiny
def test_generate_build_picks_its_backend_and_says_which(tiny_build):
    result = CliRunner().invoke(
        app, ["generate", "--build", str(tiny_build), "--prompt", PROMPTS[0], "--max-new-tokens", "12"]
    )
    assert result.exit_code == 0, result.output
    assert "backend: onnxruntime (TensorRT" in result.stderr  # this machine has no TensorRT: it says so, and why
    assert result.stdout == PROMPTS[0] + eager_text(PROMPTS[0], 12) + "\n"
    forced = CliRunner().invoke(
        app,
        [
            "generate",
            "--build",
            str(tiny_build),
            "--prompt",
            PROMPTS[0],
            "--max-new-tokens",
            "12",
            "--backend",
            "eager",
        ],
    )
    assert forced.exit_code == 2 and "--backend eager needs MODEL" in forced.output  # --backend still overrides


def test_windowless_model_past_its_cache_is_refused_before_anything_is_printed(windowless_checkpoint):
    result = CliRunner().invoke(
        app, ["generate", str(windowless_checkpoint), "--prompt", "def f(", "--max-new-tokens", "60"]
    )
    assert result.exit_code == 2
    assert result.stdout == ""
    prompt_tokens = len(load_tokenizer(windowless_checkpoint).encode("def f("))
    assert result.stderr.strip() == (
        f"error: the prompt ({prompt_tokens} tokens) + --max-new-tokens 60 needs {prompt_tokens + 60} cache slots, "
        f"more than the cache capacity {CAPACITY} of this model without sliding window; ask for at most "
        f"{CAPACITY - prompt_tokens} new tokens"
    )
    fits = CliRunner().invoke(
        app,
        [
            "generate",
            str(windowless_checkpoint),
            "--prompt",
            "def f(",
            "--max-new-tokens",
            str(CAPACITY - prompt_tokens),
        ],
    )
    assert fits.exit_code == 0, fits.output  # the largest request it names runs


def test_error_after_streamed_text_starts_on_its_own_line(windowless_checkpoint, capsys):
    """The streaming loop itself (without the command's check up front): the runner refuses the step past the cache
    after the text has streamed; the text's line is ended before the error propagates."""
    runner = EagerRunner(load_model(windowless_checkpoint))
    with pytest.raises(MistralExportError, match="exceeds the cache capacity 48"):
        _stream(runner, load_tokenizer(windowless_checkpoint), "def f(", 60, None)
    streamed = capsys.readouterr().out
    assert streamed.startswith("def f(") and len(streamed) > len("def f(\n")
    assert streamed.endswith("\n")


@needs_tiny
def test_onnx_option_on_a_build_folder_names_the_build_option(tiny_build):
    result = CliRunner().invoke(app, ["generate", "--onnx", str(tiny_build), "--prompt", "x"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: --onnx {tiny_build}: this is a build folder (it has build.json), not an "
        f"export folder; run it with --build {tiny_build}"
    )
