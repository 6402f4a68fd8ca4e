"""`mistral-export build`: stages, skipping by content keys, atomic artifacts, the build folder, and generating from it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mistral_export.artifacts.folder import find_artifacts, read_build, select_artifact
from mistral_export.cli import app
from mistral_export.engines.onnxruntime import artifact as onnxruntime_artifact
from mistral_export.errors import MistralExportError
from mistral_export.folder_lock import LOCK_FILE
from mistral_export.model.checkpoint import load_model, random_model, save_hf_checkpoint
from mistral_export.model.config import TINY_DIR
from mistral_export.model.tokenizer import load_tokenizer
from mistral_export.pipeline.build import build
from mistral_export.runners import open_runner
from mistral_export.runners.base import EagerRunner, greedy_tokens
from mistral_export.tensorrt_lib import unavailable_reason

from conftest import needs_tiny, small_config, train_sentencepiece


def last_run(out: Path) -> dict[str, str]:
    return {run["stage"]: run["action"] for run in read_build(out)["last_run"]}


def mtimes(out: Path) -> dict[str, int]:
    return {
        str(p.relative_to(out)): p.stat().st_mtime_ns
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("build.json", LOCK_FILE)
    }


@pytest.fixture(scope="module")
def cli_build(tmp_path_factory):
    """`mistral-export build tiny` through the command line, with what it printed."""
    out = tmp_path_factory.mktemp("tiny-build")
    result = CliRunner().invoke(
        app, ["build", "tiny", "-o", str(out), "--precision", "fp32", "--backend", "onnxruntime"]
    )
    assert result.exit_code == 0, result.output
    return out, result


@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    """A 2-layer HF checkpoint with the tiny fixture's tokenizer.json (the build copies it)."""
    folder = tmp_path / "checkpoint"
    save_hf_checkpoint(random_model(small_config(vocab=2048), seed=0), folder)
    shutil.copy(TINY_DIR / "tokenizer.json", folder / "tokenizer.json")
    return folder


@needs_tiny
def test_build_writes_the_layout_and_a_summary(cli_build):
    out, result = cli_build
    assert set(mtimes(out)) == {
        "tokenizer.json",
        "onnx/fp32/model.onnx",
        "onnx/fp32/model.onnx.data",
        "onnx/fp32/model.ort.onnx",
        "onnx/fp32/artifact.json",
    }  # and nothing half-written
    assert (out / "build.json").is_file()
    record = read_build(out)
    assert record["model"]["source"] == "tiny" and record["artifacts"] == ["onnx/fp32"]
    assert record["precisions"] == {"fp32": {"onnx": ["onnx/fp32"], "onnxruntime": ["onnx/fp32"]}}
    assert last_run(out) == {"tokenizer": "built", "onnx/fp32": "built", "onnxruntime/fp32": "built"}
    engine = json.loads((out / "onnx/fp32/artifact.json").read_text())
    assert engine["backend"] == "onnxruntime" and engine["cache"] == {
        "capacity": 64,
        "window": 64,
        "wraps": True,
        "dtype": "float32",
    }
    # progress per stage on stderr, the summary table on stdout
    assert "✓ onnx/fp32" in result.stderr and "onnxruntime/fp32" in result.stdout and "MiB" in result.stdout


@needs_tiny
def test_build_then_generate_matches_eager_for_4w_tokens(cli_build):
    out, _ = cli_build
    eager = EagerRunner(load_model("tiny"))
    window = eager.config.sliding_window
    prompt_text = "def read_config(path):"
    tokenizer = load_tokenizer(out)  # the build folder's own tokenizer.json
    prompt = tokenizer.encode(prompt_text)
    expected = list(greedy_tokens(eager, prompt, 4 * window))  # no stop token: exactly 4W tokens
    built = open_runner(select_artifact(out, "onnxruntime", "fp32"))
    assert list(greedy_tokens(built, prompt, 4 * window)) == expected and len(expected) == 4 * window
    if tokenizer.eos_id in expected:  # the command stops at the end-of-sequence token
        expected = expected[: expected.index(tokenizer.eos_id) + 1]
    from_build = CliRunner().invoke(
        app,
        [
            "generate",
            "--backend",
            "onnxruntime",
            "--build",
            str(out),
            "--prompt",
            prompt_text,
            "--max-new-tokens",
            str(4 * window),
        ],
    )
    assert from_build.exit_code == 0, from_build.output
    assert from_build.stdout == prompt_text + tokenizer.decode(expected) + "\n"


@needs_tiny
def test_rebuild_with_nothing_changed_does_no_work(cli_build):
    out, _ = cli_build
    before = mtimes(out)
    build("tiny", out, "fp32", "onnxruntime")
    assert set(last_run(out).values()) == {"skipped"}
    assert mtimes(out) == before


@needs_tiny
def test_inspect_build_folder(cli_build):
    out, _ = cli_build
    result = CliRunner().invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    lines = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    assert "tiny from tiny" in lines["model"]
    assert "ONNX Runtime" in lines["onnxruntime fp32"] and "window 64" in lines["onnxruntime fp32"]
    assert "plugin_impl aot" in lines["onnx fp32"] and "MiB" in lines["onnx fp32"]
    model = CliRunner().invoke(app, ["inspect", "tiny"])  # a model keeps the model summary
    assert model.exit_code == 0 and "parameters" in model.stdout.lower()


def test_precision_and_checkpoint_changes_rebuild_only_what_depends(small_checkpoint, tmp_path):
    out = tmp_path / "build"
    build(small_checkpoint, out, "fp32")
    fp32_files = {k: v for k, v in mtimes(out).items() if k.startswith("onnx/fp32")}

    build(small_checkpoint, out, "fp16")  # another precision beside the first
    assert last_run(out) == {"tokenizer": "skipped", "onnx/fp16": "built", "onnxruntime/fp16": "built"}
    assert {k: v for k, v in mtimes(out).items() if k.startswith("onnx/fp32")} == fp32_files
    assert sorted(a.precision for a in find_artifacts(out)) == ["fp16", "fp32"]
    generate = ["generate", "--backend", "onnxruntime", "--build", str(out), "--prompt", "x", "--max-new-tokens", "2"]
    several = CliRunner().invoke(app, generate)
    assert several.exit_code == 2 and "several precisions (fp16, fp32); pick one with --precision" in several.stderr
    picked = CliRunner().invoke(app, [*generate, "--precision", "fp16"])
    assert picked.exit_code == 0, picked.output  # the build folder's tokenizer.json

    os.utime(small_checkpoint / "model.safetensors")  # touched, same content: hashed again, nothing rebuilt
    build(small_checkpoint, out, "fp16")
    assert set(last_run(out).values()) == {"skipped"}

    save_hf_checkpoint(random_model(small_config(vocab=2048), seed=1), small_checkpoint)  # new weights
    build(small_checkpoint, out, "fp16")
    assert last_run(out) == {"tokenizer": "skipped", "onnx/fp16": "built", "onnxruntime/fp16": "built"}
    # fp32 was made from the old weights: removed, not left looking valid
    assert [a.precision for a in find_artifacts(out)] == ["fp16"] and not (out / "onnx/fp32/artifact.json").exists()
    runner = open_runner(select_artifact(out, "onnxruntime"))
    eager = EagerRunner(load_model(small_checkpoint))
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    runner.reset(1), eager.reset(1)
    past = torch.zeros(1, dtype=torch.int64)
    assert torch.allclose(runner.step(ids, past), eager.step(ids, past), atol=5e-2)  # fp16 of the new weights


class Interrupted(Exception):
    pass


def test_interrupted_engine_stage_leaves_nothing_and_next_build_completes(small_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "build"
    real_save = onnxruntime_artifact.onnx.save

    def save_half_then_fail(proto, path, *args, **kwargs):
        if not str(path).endswith("model.ort.onnx.tmp"):  # the export's own saves go through
            return real_save(proto, path, *args, **kwargs)
        Path(path).write_bytes(proto.SerializeToString()[:1000])  # a partial file under the temporary name
        raise Interrupted("killed while writing the ONNX Runtime artifact")

    monkeypatch.setattr(onnxruntime_artifact.onnx, "save", save_half_then_fail)
    with pytest.raises(Interrupted):
        build(small_checkpoint, out, "fp32")
    folder = out / "onnx" / "fp32"
    assert not (folder / "model.ort.onnx").exists() and not (folder / "artifact.json").exists()
    with pytest.raises(MistralExportError, match="artifact in this build folder"):
        find_artifacts(out)
    assert set(read_build(out)["stages"]) == {"tokenizer", "onnx/fp32"}  # what finished is recorded

    monkeypatch.setattr(onnxruntime_artifact.onnx, "save", real_save)
    build(small_checkpoint, out, "fp32")
    assert last_run(out) == {"tokenizer": "skipped", "onnx/fp32": "skipped", "onnxruntime/fp32": "built"}
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".staging")]
    runner = open_runner(select_artifact(out, "onnxruntime", "fp32"))
    runner.reset(1)
    assert runner.step(torch.tensor([[1, 2, 3]]), torch.zeros(1, dtype=torch.int64)).shape == (1, 3, 2048)


@pytest.mark.skipif(unavailable_reason() is None, reason="TensorRT and a GPU are present here")
def test_backend_tensorrt_without_tensorrt_is_one_error_line_and_keeps_the_onnx(small_checkpoint, tmp_path):
    out = tmp_path / "build"
    result = CliRunner().invoke(app, ["build", str(small_checkpoint), "-o", str(out), "--backend", "tensorrt"])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pip install 'mistral-export[tensorrt]'" in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert (out / "onnx/fp32/model.onnx").exists() and (out / "onnx/fp32/model.onnx.data").exists()
    assert "onnx/fp32" in read_build(out)["stages"]

    auto = CliRunner().invoke(app, ["build", str(small_checkpoint), "-o", str(out)])  # auto: says which and why
    assert auto.exit_code == 0, auto.output
    assert "backend: onnxruntime (" in auto.stderr and "TensorRT is not installed" in auto.stderr
    assert last_run(out) == {"tokenizer": "skipped", "onnx/fp32": "skipped", "onnxruntime/fp32": "built"}


def test_generate_needs_engine_for_tensorrt():
    missing = CliRunner().invoke(app, ["generate", "--backend", "tensorrt", "--prompt", "x"])
    assert missing.exit_code == 2 and "--backend tensorrt needs --build DIR" in missing.stderr


def test_native_checkpoint_with_a_sentencepiece_tokenizer_end_to_end(tmp_path):
    """Mistral's native layout (params.json, consolidated.safetensors, tokenizer.model): generate from it, build it
    (the build folder carries the converted tokenizer.json), generate from the build: the same text."""
    from helpers import write_native

    save_hf_checkpoint(random_model(small_config(vocab=800), seed=2), tmp_path / "hf")
    native = tmp_path / "native"
    write_native(tmp_path / "hf", native)
    train_sentencepiece(native / "tokenizer.model")
    cli = CliRunner()
    args = ["--prompt", "def f(x):\n    return x + 1", "--max-new-tokens", "12"]
    eager = cli.invoke(app, ["generate", str(native), *args])
    assert eager.exit_code == 0, eager.output
    out = tmp_path / "build"
    built = cli.invoke(app, ["build", str(native), "-o", str(out), "--backend", "onnxruntime"])
    assert built.exit_code == 0, built.output
    assert read_build(out)["stages"]["tokenizer"]["inputs"]["source"] == "tokenizer.model"
    assert (out / "tokenizer.json").exists()
    from_build = cli.invoke(app, ["generate", "--backend", "onnxruntime", "--build", str(out), *args])
    assert from_build.exit_code == 0, from_build.output
    assert from_build.stdout == eager.stdout and len(eager.stdout) > len("def f(x):")
