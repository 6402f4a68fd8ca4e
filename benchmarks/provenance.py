"""Where a benchmark result comes from: git commit, command, versions and machine (every results file records it).

On a machine whose copy of the repository has no .git (e.g. a GPU box that received the working tree only), the
commit comes from MISTRAL_EXPORT_COMMIT if set.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def git_commit() -> str:
    """HEAD's hash, marked when tracked files other than results differ from it (the numbers then come from
    uncommitted code; a results file rewritten by an earlier run is not code)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", f":!{RESULTS.relative_to(REPO)}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("MISTRAL_EXPORT_COMMIT", "unknown (no git checkout; set MISTRAL_EXPORT_COMMIT)")
    return head + (" with uncommitted changes" if changed else "")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _proc_field(path: str, key: str) -> str:
    try:
        with open(path) as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith(key)), "?")
    except OSError:
        return "?"


def provenance(packages: tuple[str, ...], env: tuple[str, ...] = ()) -> dict:
    """Commit, command (with the environment variables in `env` that were set), versions, machine, start time."""
    settings = [f"{name}={os.environ[name]}" for name in env if name in os.environ]
    machine = {
        "cpu": _proc_field("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "memory": _proc_field("/proc/meminfo", "MemTotal"),
    }
    if "torch" in packages:  # the GPU, where torch sees one
        import torch

        if torch.cuda.is_available():
            machine["gpu"] = torch.cuda.get_device_name()
            machine["gpu_capability"] = list(torch.cuda.get_device_capability())
    return {
        "git_commit": git_commit(),
        "command": " ".join([*settings, "python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in packages}},
        "machine": machine,
    }


def markdown(p: dict) -> str:
    """The provenance as the lines a results .md starts with."""
    m = p["machine"]
    gpu = f"{m['gpu']} (sm_{''.join(map(str, m['gpu_capability']))}); " if "gpu" in m else ""
    versions = ", ".join(f"{k} {v}" for k, v in p["versions"].items())
    return (
        f"Commit `{p['git_commit']}`; command `{p['command']}`; started {p['started']}.\n"
        f"Machine: {gpu}{m['cpu']}, {m['cores']} cores, {m['memory']}. Versions: {versions}.\n"
    )


def save_results(out: Path, result: dict, text: str, indent: int = 2) -> None:
    """OUT.json (RESULT) and OUT.md (TEXT), the folder made; TEXT printed too."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=indent) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


def gpu_tag() -> str:
    """Short name of the CUDA device for results file names (h200, a100, l4, ...)."""
    import torch

    name = torch.cuda.get_device_name().lower()
    m = re.search(r"(h100|h200|a100|l40s?|l4|a10g?|b200|gb200|rtx ?\d+)", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name)).replace(" ", "")


if __name__ == "__main__":
    # For benchmarks/gpu_check.sh: `--gpu-tag` prints the tag; `--header PACKAGES...` the provenance lines.
    if sys.argv[1:2] == ["--gpu-tag"]:
        print(gpu_tag())
    else:
        print(markdown(provenance(tuple(sys.argv[2:]))), end="")
