"""Each room knows only what it must: the model package never imports the export package, runners read artifacts
only (they import neither the exporter nor the build pipeline), and no module imports itself back through others
(imports inside functions count)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mistral_export"

BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"blocked: {{name}}")
for name in [m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED)]:
    del sys.modules[name]
sys.meta_path.insert(0, Block())
"""

MODEL_RUNS = """
import torch
import mistral_export.model.transformer as t
from mistral_export.model.checkpoint import random_model
from mistral_export.model.config import ModelConfig
from mistral_export.runners.base import EagerRunner, prefill
config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                     head_dim=8, sliding_window=4)
runner = EagerRunner(random_model(config))
runner.reset(1)
print(tuple(prefill(runner, torch.arange(10).view(1, 10), 3).shape))
"""

RUNNERS_IMPORT = """
import mistral_export.runners, mistral_export.runners.base, mistral_export.runners.onnxruntime
import mistral_export.runners.tensorrt, mistral_export.artifacts.folder, mistral_export.artifacts.description
import mistral_export.deploy.generation, mistral_export.deploy.scheduler
print("ok")
"""


def run_blocked(blocked: list[str], code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER.format(blocked=blocked) + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_model_runs_with_the_export_package_blocked():
    proc = run_blocked(["mistral_export.export"], MODEL_RUNS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "(1, 10, 50)"


def test_runners_and_the_serving_side_import_neither_exporter_nor_pipeline():
    proc = run_blocked(["mistral_export.export", "mistral_export.pipeline", "mistral_export.engines"], RUNNERS_IMPORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


def test_blocker_really_blocks():
    proc = run_blocked(["mistral_export.export"], MODEL_RUNS + "\nimport mistral_export.export.onnx_export\n")
    assert proc.returncode != 0 and "blocked: mistral_export.export" in proc.stderr


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules PATH imports anywhere in it (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            # `from a.b import c`: module a.b.c if there is one, else names defined in a.b
            names = [m for m in submodules if m in modules] + [node.module] * any(m not in modules for m in submodules)
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py") if "fixtures" not in p.parts}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def test_no_import_cycle_in_the_package():
    assert find_cycle(package_graph()) is None, " -> ".join(find_cycle(package_graph()))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
