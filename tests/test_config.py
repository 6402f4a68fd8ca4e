import json

import pytest
from typer.testing import CliRunner

from mistral_export.cli import app
from mistral_export.errors import MistralExportError
from mistral_export.model.config import ModelConfig, load_config

HF_V01 = {  # the fields of mistralai/Mistral-7B-v0.1's config.json
    "architectures": ["MistralForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 32000,
}
NATIVE_V03 = {
    "dim": 4096,
    "n_layers": 32,
    "head_dim": 128,
    "hidden_dim": 14336,
    "n_heads": 32,
    "n_kv_heads": 8,
    "norm_eps": 1e-05,
    "vocab_size": 32768,
    "rope_theta": 1000000.0,
}


def test_hf_config_equals_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_V01))
    assert load_config(tmp_path).replace(name="x") == load_config("mistral-7b-v0.1").replace(name="x")


def test_native_params_equals_preset(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(NATIVE_V03))
    config = load_config(tmp_path)
    assert config.replace(name="x") == load_config("mistral-7b-v0.3").replace(name="x")
    assert config.sliding_window is None and config.cache_capacity == 32768


def test_presets_shapes():
    v01, v03 = load_config("mistral-7b-v0.1"), load_config("mistral-7b-v0.3")
    assert (v01.cache_capacity, v01.vocab_size, v01.rope_theta) == (4096, 32000, 10000.0)
    assert (v03.sliding_window, v03.vocab_size, v03.rope_theta) == (None, 32768, 1e6)
    assert 7.2e9 < v01.parameter_count() < 7.3e9  # Mistral 7B has 7.24B parameters
    # The rolling cache keeps v0.1's memory flat past the window; v0.3's linear cache grows.
    assert v01.kv_cache_bytes(32768) == v01.kv_cache_bytes(4096) == 512 * 2**20
    assert v03.kv_cache_bytes(32768) == 8 * v03.kv_cache_bytes(4096)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_kv_heads=3), r"num_heads \(8\) must be divisible by num_kv_heads \(3\)"),
        (dict(sliding_window=0), "sliding_window must be a positive integer or absent"),
        (dict(head_dim=33), "head_dim must be even"),
        (dict(hidden_size=-1), "hidden_size must be a positive integer"),
    ],
)
def test_invalid_config_is_explained(change, message):
    settings = dict(
        vocab_size=10,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=8,
        num_kv_heads=2,
        head_dim=8,
        sliding_window=4,
    )
    settings.update(change)
    with pytest.raises(MistralExportError, match=message):
        ModelConfig(**settings)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "config.json: not valid JSON"),
        (json.dumps({**HF_V01, "model_type": "llama"}), "model_type is 'llama', expected 'mistral'"),
        (
            json.dumps({k: v for k, v in HF_V01.items() if k != "num_hidden_layers"}),
            "missing required field 'num_hidden_layers'",
        ),
    ],
)
def test_bad_config_file_via_cli(tmp_path, content, message):
    (tmp_path / "config.json").write_text(content)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_inspect_reports_cache_for_presets():
    result = CliRunner().invoke(app, ["inspect", "mistral-7b-v0.1", "--context", "16384"])
    assert result.exit_code == 0
    assert "7,241,732,096" in result.output
    assert "KV cache per sequence at 16384 tokens (fp16)  512.00 MiB" in result.output
    result = CliRunner().invoke(app, ["inspect", "mistral-7b-v0.3", "--context", "16384"])
    assert "KV cache per sequence at 16384 tokens (fp16)  2.00 GiB" in result.output


def test_unknown_model_lists_presets():
    result = CliRunner().invoke(app, ["inspect", "mistral-13b"])
    assert result.exit_code == 2 and "presets: tiny, mistral-7b-v0.1, mistral-7b-v0.3" in result.output
