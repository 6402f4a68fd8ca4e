"""`mistral-export export` and `generate --backend onnxruntime` from the command line, and atomic artifacts."""

import pytest
import torch
from typer.testing import CliRunner

from mistral_export.cli import app
from mistral_export.engines.onnxruntime.artifact import write_onnxruntime_artifact
from mistral_export.export import onnx_export, weight_streaming
from mistral_export.model.checkpoint import random_model, save_hf_checkpoint
from mistral_export.runners.base import EagerRunner, prefill
from mistral_export.runners.onnxruntime import OnnxRuntimeRunner

from conftest import needs_tiny, small_config


@needs_tiny
def test_export_then_generate_with_onnxruntime_matches_eager(tmp_path):
    cli = CliRunner()
    result = cli.invoke(app, ["export", "tiny", "-o", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [
        "artifact.json",
        "model.onnx",
        "model.onnx.data",
        "model.ort.onnx",
    ]
    args = ["generate", "tiny", "--prompt", "class Parser:", "--max-new-tokens", "24"]
    ort_run = cli.invoke(app, [*args, "--backend", "onnxruntime", "--onnx", str(tmp_path / "onnx")])
    eager_run = cli.invoke(app, args)
    assert ort_run.exit_code == eager_run.exit_code == 0
    assert ort_run.stdout == eager_run.stdout
    assert len(ort_run.stdout) > len("class Parser:") + 20
    assert "tokens/s" in ort_run.stderr


def test_onnxruntime_backend_needs_an_export(tmp_path):
    result = CliRunner().invoke(
        app, ["generate", "tiny", "--prompt", "x", "--backend", "onnxruntime", "--onnx", str(tmp_path)]
    )
    assert result.exit_code == 2 and "no ONNX Runtime artifact here" in result.output


class Interrupted(Exception):
    pass


def test_interrupted_export_leaves_previous_artifacts_intact(tmp_path, monkeypatch):
    config = small_config(head_dim=32, heads=4, kv_heads=2, window=16)
    folder = tmp_path / "ckpt"
    save_hf_checkpoint(random_model(config, seed=7), folder)
    out = tmp_path / "onnx"
    onnx_export.export_onnx(folder, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real_write = weight_streaming.write_weights

    def write_then_die(path, slots, tensors):
        real_write(path, slots[:1], tensors)  # part of the weights are on disk when the "power fails"
        raise Interrupted

    monkeypatch.setattr(weight_streaming, "write_weights", write_then_die)
    with pytest.raises(Interrupted):
        onnx_export.export_onnx(folder, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging left, nothing replaced
    with pytest.raises(Interrupted):
        onnx_export.export_onnx(folder, tmp_path / "fresh")
    assert list((tmp_path / "fresh").iterdir()) == []  # no model.onnx that looks valid

    monkeypatch.undo()
    write_onnxruntime_artifact(out / "model.onnx")
    ids = torch.randint(0, config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    eager = EagerRunner(random_model(config, seed=7))
    eager.reset(1)
    runner = OnnxRuntimeRunner(out)
    runner.reset(1)
    assert (prefill(runner, ids) - prefill(eager, ids)).abs().max() <= 1e-4


def test_export_output_must_be_a_folder(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("not a folder")
    result = CliRunner().invoke(app, ["export", "tiny", "-o", str(target)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{target}: output must be a folder" in result.output
