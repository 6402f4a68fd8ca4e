"""A process's descendants and whether a process still runs, read from /proc (Linux). `serve` watches its server's
Python stubs with these; the fault tests and the soak benchmark read the same tree. By hand: psutil would be a
dependency for these few lines."""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")


def descendants(root: int) -> dict[int, str]:
    """pid -> program name (/proc/PID/stat: the kernel keeps 15 characters) of every process below ROOT."""
    parents, names = {}, {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                names[int(entry.name)] = stat[stat.index("(") + 1 : stat.rindex(")")]
            except (OSError, IndexError, ValueError):  # gone while being read
                continue
    found, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = names[pid]
                todo.append(pid)
    return found


def running(pid: int) -> bool:
    """PID exists and is neither a zombie nor dead."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False
