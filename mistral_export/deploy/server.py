"""`mistral-export serve`: start Triton Inference Server on a model repository.

The server is `tritonserver` from PATH (the full server image, with its own backends), or else the one
the `nvidia-pytriton` wheel ships (Python backend only, enough for the ONNX Runtime layout). That one
needs a backend folder holding the Python stub built for the running Python, so `serve` assembles a
writable copy of the wheel's backends with the matching stub. The stub's embedded Python finds
packages through the `python3` on PATH, so the server starts with this environment's bin first.

Shutdown: the server runs in a process group of its own (with its Python stubs), so a terminal's Ctrl-C reaches only
`serve`, which stops it once. First it announces the shutdown to the models (it creates the file the server's
environment names in SHUTDOWN_FILE_ENV; the generate model ends its running requests with an error when it appears:
Triton itself keeps a model ready while it waits for open HTTP streams, then exits with them open, and an HTTP
stream cut that way looks finished to its client). Then SIGTERM (Triton's clean shutdown: no new requests,
in-flight ones get EXIT_TIMEOUT_S to finish), then SIGKILL to the whole group after STOP_TIMEOUT_S or at a second
signal. The server gets SIGTERM from the kernel if `serve` itself dies (PR_SET_PDEATHSIG): no server is left
behind without its `serve`.

A model's Python stub dying (killed, out of memory) is fatal: Triton's Python backend neither answers the dead
stub's in-flight requests (their clients would wait forever) nor reports the model unready; it restarts the stub
only when the next request arrives. So `serve` watches the stubs (`supervise`) and, when one dies, stops the
server (its health endpoints say not ready, in-flight requests end with an error as their connections close) and
exits with code 1 and a message: a process supervisor (systemd, Kubernetes) restarts it whole, with a fresh stub.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mistral_export.deploy.processes import PROC, descendants, running
from mistral_export.errors import MistralExportError

READY_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 5  # Triton waits this long for in-flight requests after SIGTERM (its default, 30 s, outlasts users)
STOP_TIMEOUT_S = 10.0  # then the server's group is killed
PR_SET_PDEATHSIG = 1
SHUTDOWN_FILE_ENV = "MISTRAL_EXPORT_SHUTDOWN_FILE"  # the server's models see the shutdown begin when it exists
STUB_NAME = "triton_python_backend_stub"
WATCH_INTERVAL_S = 0.5
STUB_SCAN_S = 0.25  # how often a StubWatch looks for the stubs (a /proc walk, about a millisecond)
FAULT_STOP_TIMEOUT_S = 2.0


class ServerFault(Exception):
    """The server can no longer serve a model (its backend process died): `serve` stops it and exits 1."""


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _server_from_wheel(work: Path) -> tuple[Path, Path, Path]:
    """(tritonserver binary, backend folder, shared libraries) of the nvidia-pytriton wheel, with the
    Python stub for this Python in the backend folder."""
    try:
        import pytriton
    except ImportError:
        raise MistralExportError(
            "no `tritonserver` on PATH and the nvidia-pytriton wheel is not installed: "
            "pip install 'mistral-export[deploy]', or run inside Triton's server image"
        ) from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.exists():
        raise MistralExportError(
            f"{stub.parent.parent}: nvidia-pytriton ships no Python backend stub for Python {python}"
        )
    backends = work / "backends"
    shutil.copytree(root / "backends", backends)
    shutil.copy2(stub, backends / "python" / stub.name)
    return root / "bin" / "tritonserver", backends, root.parent.parent / "nvidia_pytriton.libs"


def server_command(repository: Path, ports: Ports, host: str, work: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start the server.

    The environment puts this Python's bin first on PATH (the stub imports mistral_export through it);
    with the wheel's server also its bundled libraries on LD_LIBRARY_PATH (the stub links against them).
    """
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **{SHUTDOWN_FILE_ENV: str(shutdown_file(work))},
    )
    binary = shutil.which("tritonserver")
    extra: list[str] = []
    if binary is None:
        server, backends, libs = _server_from_wheel(work)
        binary, extra = str(server), [f"--backend-directory={backends}"]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), os.environ.get("LD_LIBRARY_PATH")]))
    command = [
        binary,
        f"--model-repository={repository}",
        *extra,
        f"--http-address={host}",
        f"--http-port={ports.http}",
        f"--grpc-address={host}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-address={host}",
        f"--metrics-port={ports.metrics}",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
    ]
    return command, env


def _ready(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_ready(process: subprocess.Popen, host: str, port: int, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MistralExportError(
                f"tritonserver exited with code {process.returncode} before it was ready (its log above says why)"
            )
        if _ready(host, port):
            return
        time.sleep(0.2)
    raise MistralExportError(f"tritonserver was not ready after {timeout:.0f} s")


def shutdown_file(work: Path) -> Path:
    return Path(work) / "shutting-down"


def stop(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S, announce: Path | None = None) -> int:
    """Create ANNOUNCE (the models end their requests), SIGTERM (Triton's clean shutdown), then SIGKILL to the
    server's process group if it is still running after TIMEOUT or a second signal interrupts the wait. Returns the
    server's exit code.

    The group is killed once more after the server has exited but before it is reaped (its pid, and so the group's
    id, cannot be reused yet): a Python stub that outlived its server goes with it."""
    if process.returncode is None:  # not reaped yet: its pid, and its group's id, are still the server's
        try:
            if announce is not None:
                announce.touch()
            os.kill(process.pid, signal.SIGTERM)  # not Popen.send_signal: that reaps an exited server first
            _wait_unreaped(process.pid, timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            _kill_group(process.pid)
            _wait_unreaped(process.pid, None)
        _kill_group(process.pid)
    return process.wait()


def _wait_unreaped(pid: int, timeout: float | None) -> None:
    """Until process PID has exited, leaving it a zombie (os.waitid WNOWAIT): Popen.wait reaps it afterwards."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(pid), timeout)
            time.sleep(0.05)
    except ChildProcessError:  # already reaped (Popen.poll): nothing left to wait for
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class StubWatch:
    """The server's Python stubs as a thread records them from the server's start (they start while the models
    load): a stub killed before `supervise` begins (while the frontend starts), the server aborting with it, is still
    known and reported as the stub's death. A stub that ended and was followed by another while the server loaded is
    not a death: the Python backend runs one to complete a model's configuration, ends it, then starts the model's
    own (whether that one is killed before or after `serve` notices the server is ready)."""

    def __init__(self, process: subprocess.Popen, interval: float = STUB_SCAN_S):
        self.pid, self.interval = process.pid, interval
        self.stubs: dict[int, str] = {}  # in the order first seen
        self.while_loading: set[int] = set()
        self.loading = True
        self.lock = threading.Lock()
        threading.Thread(target=self._record, name="stub-watch", daemon=True).start()

    def seen(self) -> dict[int, str]:
        """The stubs whose death would be a fault: all recorded, but those replaced while the server loaded."""
        with self.lock:
            order = list(self.stubs)
            replaced = {
                pid
                for i, pid in enumerate(order)
                if any(later in self.while_loading for later in order[i + 1 :]) and not running(pid)
            }
            return {pid: model for pid, model in self.stubs.items() if pid not in replaced}

    def ready(self) -> None:
        with self.lock:
            self.loading = False

    def _record(self) -> None:
        while True:
            found = _stubs(self.pid, self.seen())
            with self.lock:
                for pid, model in found.items():
                    if pid not in self.stubs:
                        self.stubs[pid] = model
                        if self.loading:
                            self.while_loading.add(pid)
            try:
                _wait_unreaped(self.pid, self.interval)  # not reaped: stop() still needs the server's pid
                return
            except subprocess.TimeoutExpired:
                continue


_watches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # server process -> its StubWatch


def supervise(process: subprocess.Popen, interval: float = WATCH_INTERVAL_S) -> None:
    """Return when the server exits; when one of its Python stubs dies first, stop the server and raise ServerFault.
    PROCESS comes from `running_server`, whose StubWatch has recorded the stubs since the server started."""
    watch = _watches[process]
    while True:
        try:
            _wait_unreaped(process.pid, interval)
            exited = True
        except subprocess.TimeoutExpired:
            exited = False
        for pid, model in watch.seen().items():
            if not running(pid):  # the server may abort with it (a lock the stub held in shared memory)
                # No clean shutdown to wait for: Triton cannot unload a model whose stub is gone.
                stop(process, timeout=FAULT_STOP_TIMEOUT_S)
                raise ServerFault(
                    f"the Python backend stub {model} (pid {pid}) died"
                    + (", and the server with it" if exited else ": its requests can no longer be answered")
                )
        if exited:
            return


def _stubs(server_pid: int, known: dict[int, str]) -> dict[int, str]:
    """pid -> which model ("of model 'NAME'") for the server's Python stubs: its descendants whose program name
    (/proc/PID/stat) is the stub's; the backend may start them through a shell. A new stub's command line (STUB
    model_repository/NAME/1/model.py ...) is read once for the model's name; seen from `serve` it sometimes reads
    empty, and the stub is watched all the same."""
    found = {}
    for pid, name in descendants(server_pid).items():
        if name != STUB_NAME[:15]:  # the kernel keeps 15 characters of a program's name
            continue
        if pid in known:
            found[pid] = known[pid]
            continue
        try:
            command = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
            found[pid] = f"of model '{Path(command[1].decode()).parent.parent.name}'"
        except (OSError, IndexError, UnicodeDecodeError):  # its command line may read empty: name no model
            found[pid] = "of a model"
    return found


def _die_with_parent() -> None:
    """In the server's process, before exec: the kernel sends it SIGTERM (a clean shutdown, stubs included) when
    `serve` dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: serve's own handlers still stop it
        pass


@contextmanager
def running_server(repository: Path, ports: Ports, host: str = "127.0.0.1", log=None):
    """A started, ready server (the process) for the duration of the block; stopped cleanly after."""
    repository = Path(repository).resolve()
    if not (repository.is_dir() and any(repository.glob("*/config.pbtxt"))):
        raise MistralExportError(
            f"{repository}: not a model repository (no */config.pbtxt; "
            f"`mistral-export package BUILD -o REPO` writes one)"
        )
    with tempfile.TemporaryDirectory(prefix="mistral-export-triton-") as work:
        command, env = server_command(repository, ports, host, Path(work))
        # Its own session: Ctrl-C reaches only us, and we stop the server once (a second signal kills it).
        process = subprocess.Popen(
            command,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
        )
        _watches[process] = watch = StubWatch(process)
        try:
            wait_ready(process, host, ports.http)
            watch.ready()
            yield process
        finally:
            stop(process, announce=shutdown_file(Path(work)))
