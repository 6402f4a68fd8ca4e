"""Each room knows only what it must: the model package never imports the export package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK_EXPORT = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mistral_export.export" or name.startswith("mistral_export.export."):
            raise ImportError(f"blocked: {name}")
for name in [m for m in sys.modules if m.startswith("mistral_export.export")]:
    del sys.modules[name]
sys.meta_path.insert(0, Block())
import torch
import mistral_export.model.transformer as t
from mistral_export.model.checkpoint import random_model
from mistral_export.model.config import ModelConfig
from mistral_export.engines.runner import EagerRunner, prefill
config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                     head_dim=8, sliding_window=4)
runner = EagerRunner(random_model(config))
runner.reset(1)
print(tuple(prefill(runner, torch.arange(10).view(1, 10), 3).shape))
"""


def test_model_runs_with_the_export_package_blocked():
    proc = subprocess.run([sys.executable, "-c", BLOCK_EXPORT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "(1, 10, 50)"


def test_blocker_really_blocks():
    code = BLOCK_EXPORT + "\nimport mistral_export.export.onnx_export\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "blocked: mistral_export.export" in proc.stderr
