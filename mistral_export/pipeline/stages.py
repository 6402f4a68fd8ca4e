"""Stage bookkeeping for `build`: content fingerprints, and whether a stage's recorded outputs still stand.

A stage runs when the key of its inputs (content hashes of the checkpoint, config, options, tool and library
versions, and the keys of the stages it reads) differs from the one recorded in build.json, or when one of its
recorded outputs is missing or was touched since (size or mtime changed). File hashes are cached by
(size, mtime_ns) in build.json, as git's index does, so a rebuild with nothing changed reads no checkpoint bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from mistral_export.files import file_sha256, tool_version

PACKAGE_DIR = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def tool_fingerprint() -> str:
    """The version plus a hash of the package's own sources and texts (the default calibration text shapes int8
    artifacts): a development install that changed any of them rebuilds, where the version alone would not say so."""
    digest = hashlib.sha256()
    for path in sorted(p for p in PACKAGE_DIR.rglob("*") if p.suffix in (".py", ".txt")):
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode() + b"\0" + path.read_bytes())
    return f"{tool_version()}+{digest.hexdigest()[:16]}"


def key_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def stat_signature(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def hash_files(
    files: Iterable[tuple[str, Path]], known: dict | None = None, on_bytes: Callable[[int], None] | None = None
) -> dict[str, dict]:
    """name -> {size, mtime_ns, sha256}; a file whose size and mtime match `known[name]` keeps its recorded hash."""
    known = known or {}
    result = {}
    for name, path in files:
        signature = stat_signature(path)
        previous = known.get(name)
        if previous and all(previous.get(k) == v for k, v in signature.items()) and previous.get("sha256"):
            result[name] = {**signature, "sha256": previous["sha256"]}
            continue
        result[name] = {**signature, "sha256": file_sha256(path)}
        if on_bytes:
            on_bytes(signature["size"])
    return result


def combined_sha256(files: dict[str, dict]) -> str:
    return key_of({name: entry["sha256"] for name, entry in files.items()})


def outputs_intact(build_dir: Path, outputs: dict[str, dict]) -> bool:
    """Every recorded output exists with the size and mtime it had when its stage finished."""
    for name, signature in outputs.items():
        path = build_dir / name
        if not path.is_file() or stat_signature(path) != {k: signature[k] for k in ("size", "mtime_ns")}:
            return False
    return True


def record_outputs(build_dir: Path, paths: Iterable[Path]) -> dict[str, dict]:
    return {str(path.relative_to(build_dir)): stat_signature(path) for path in paths}


@contextmanager
def staging_folder(parent: Path, name: str):
    """A fresh hidden folder under `parent` to write a stage's files into; removed afterwards, whatever happens.

    Files are moved from it to their final names (os.replace, same file system) only once complete.
    """
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".staging-{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(parent: Path) -> None:
    """Leftovers of an interrupted build (hidden staging folders and temporary files never renamed)."""
    if not parent.is_dir():
        return
    for path in [*parent.rglob(".staging-*"), *parent.rglob(".export-*")]:
        shutil.rmtree(path, ignore_errors=True)
    for path in parent.rglob(".*.tmp"):
        path.unlink(missing_ok=True)
    for path in parent.rglob("*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
