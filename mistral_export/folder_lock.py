"""One writer at a time per folder (a build folder, a model repository): an advisory lock on a file inside it.

`fcntl.flock` on `FOLDER/.mistral-export.lock`: the kernel releases it when the holder's file is closed, which
includes the holder dying by any signal, so a killed build never leaves a stale lock behind. The file holds the
holder's pid and command (what a waiting writer names); it is never deleted (deleting a lock file lets two
writers lock two different files). Linux and macOS; readers (inspect, generate, serve) take no lock.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mistral_export.errors import MistralExportError

LOCK_FILE = ".mistral-export.lock"


@contextmanager
def folder_lock(
    folder: Path, what: str, wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold FOLDER's lock for the block. Held by another process: wait for it (telling `on_wait` once, with who
    holds it), or with wait=False raise a MistralExportError naming the holder. WHAT names the writer ("build")."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            if not wait:
                raise MistralExportError(
                    f"{folder}: another {what} is writing here ({holder}); wait for it to "
                    f"finish, or run without --no-wait to wait for it"
                ) from None
            if on_wait is not None:
                on_wait(f"waiting for another {what} writing into {folder} ({holder}) to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
        handle.flush()
        yield  # closing the file (after the block, or at the process's death) releases the lock


def _holder(handle) -> str:
    handle.seek(0)
    return handle.read().strip() or "a process that has not written its name yet"
