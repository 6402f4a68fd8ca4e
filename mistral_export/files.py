"""File helpers every stage uses: content hashes, write-then-rename, JSON documents, the tool's version.

Below every other module of the package (imports nothing of it but errors), so any stage or runner may use it.
A file is written under `.<name>.tmp` in its own folder and renamed when complete: a reader, or the next
build after an interrupted one, never sees half a file under its final name (the build pipeline removes
`*.tmp` leftovers).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mistral_export.errors import MistralExportError


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """Yields the temporary path to write; renamed to PATH when the block ends normally, removed otherwise."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    with written_atomically(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, document: dict) -> None:
    write_text_atomic(path, json.dumps(document, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str) -> dict:
    """A JSON object from PATH, or a clear error naming the file and WHAT it should have been."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MistralExportError(f"{path}: no {what} here") from None
    except json.JSONDecodeError as exc:
        raise MistralExportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise MistralExportError(f"{path}: expected a JSON object")
    return document


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def tool_version() -> str:
    return package_version("mistral-export") or "0+unknown"
