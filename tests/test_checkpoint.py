"""Checkpoint loading: both layouts, shards, lazy reading, and a clear message for each bad input."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from mistral_export.cli import app
from mistral_export.errors import MistralExportError
from mistral_export.model.checkpoint import (
    internal_to_hf,
    load_model,
    random_model,
    save_hf_checkpoint,
)
from mistral_export.model.transformer import allocate_cache

from conftest import small_config
from helpers import write_native

CONFIG = small_config(head_dim=32, heads=8, kv_heads=2, window=16)


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    folder = tmp_path / "hf"
    save_hf_checkpoint(random_model(CONFIG, seed=5), folder)
    return folder


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids, torch.zeros(1, dtype=torch.int64), allocate_cache(model.config, 1))[0]


def test_native_layout_gives_identical_logits(hf_dir, tmp_path):
    native = tmp_path / "native"
    write_native(hf_dir, native)
    ids = torch.randint(0, CONFIG.vocab_size, (1, 3 * 16 + 5), generator=torch.Generator().manual_seed(0))
    hf_model, native_model = load_model(hf_dir), load_model(native)
    with safe_open(str(native / "consolidated.safetensors"), "pt") as f:  # the layouts really differ on disk
        with safe_open(str(hf_dir / "model.safetensors"), "pt") as g:
            assert not torch.equal(
                f.get_tensor("layers.0.attention.wq.weight"), g.get_tensor("model.layers.0.self_attn.q_proj.weight")
            )
    assert torch.equal(logits_of(hf_model, ids), logits_of(native_model, ids))


def test_sharded_checkpoint_loads(hf_dir, tmp_path):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(hf_dir / "config.json", sharded)
    weight_map, shards = {}, [{}, {}]
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        for i, key in enumerate(sorted(f.keys())):
            shards[i % 2][key] = f.get_tensor(key)
    for i, shard in enumerate(shards):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file(shard, str(sharded / name))
        weight_map.update({k: name for k in shard})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = torch.randint(0, CONFIG.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits_of(load_model(sharded), ids), logits_of(load_model(hf_dir), ids))


def test_load_casts_to_target_dtype(hf_dir):
    model = load_model(hf_dir, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert not any(p.is_meta for p in model.parameters())


# --- bad input: each gives its message naming the file/tensor and a non-zero exit, no traceback ---


def rewrite(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(path))


def drop_tensor(t):
    del t[internal_to_hf("layers.1.attention.wk.weight")]


def add_tensor(t):
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)


def wrong_shape(t):
    t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)


def truncate(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def corrupt(folder):
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")


def pickle_only(folder):
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.ones(1)}, folder / "pytorch_model.bin")


CASES = {
    "missing tensor": (
        lambda d: rewrite(d, drop_tensor),
        r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.weight",
    ),
    "unexpected tensor": (
        lambda d: rewrite(d, add_tensor),
        r"unexpected tensors: model\.layers\.0\.self_attn\.rotary_emb\.inv_freq",
    ),
    "wrong shape": (
        lambda d: rewrite(d, wrong_shape),
        r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' has shape \[95, 64\], expected \[96, 64\]",
    ),
    "truncated": (truncate, r"model\.safetensors: not a readable safetensors file"),
    "corrupt": (corrupt, r"model\.safetensors: not a readable safetensors file"),
    "pickle": (pickle_only, r"only pickle checkpoints found \(pytorch_model\.bin\).*not loaded"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_checkpoint_is_refused_with_a_clear_message(hf_dir, case):
    damage, message = CASES[case]
    damage(hf_dir)
    with pytest.raises(MistralExportError, match=message):
        load_model(hf_dir)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_cli_reports_bad_checkpoint_without_traceback(hf_dir, case):
    damage, message = CASES[case]
    damage(hf_dir)
    result = CliRunner().invoke(app, ["generate", str(hf_dir), "--prompt", "x", "--max-new-tokens", "2"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ")
    assert re.search(message, result.output.replace("\n", " ")), result.output


def test_console_script_exits_nonzero_with_one_line(hf_dir):
    truncate(hf_dir)
    done = subprocess.run(
        [sys.executable, "-m", "mistral_export.cli", "generate", str(hf_dir), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert str(hf_dir / "model.safetensors") in done.stderr
