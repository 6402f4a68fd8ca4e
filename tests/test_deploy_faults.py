"""`mistral-export serve` under faults, each against the real server (127.0.0.1, free ports) started as a user does
(`mistral-export serve` in a process of its own): SIGTERM before it is ready, when idle, and mid-stream with gRPC and
HTTP clients (then a second SIGTERM), and SIGKILL of the model's Python stub mid-request. Each ends within a bound,
with every process of the server's tree gone (read from /proc, not only the port), and every cut request ended by an
error its client sees."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from mistral_export.deploy.processes import PROC, descendants, running
from mistral_export.deploy.repository import package
from mistral_export.deploy.server import Ports, free_port

from helpers import PROMPTS

grpcclient = pytest.importorskip("tritonclient.grpc", reason="the deploy extra (tritonclient) is not installed")
pytest.importorskip("pytriton", reason="the deploy extra (nvidia-pytriton: the server) is not installed")

MODEL = "tiny"
EXIT_BOUND_S = 15.0  # serve exits this soon after the first SIGTERM
LONG = 4000  # tokens: longer than a shutdown lets a stream run (tiny's context is 4096)


@pytest.fixture(scope="module")
def repository(tiny_build, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults") / "repository"
    package(tiny_build, folder, name=MODEL, max_batch=8)
    return folder


def process_tree(root: int) -> dict[int, str]:
    """pid -> command of ROOT's descendants, from /proc."""
    found = {}
    for pid in descendants(root):
        try:
            found[pid] = (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            found[pid] = ""
    return found


class Serve:
    """`mistral-export serve REPOSITORY` as a user starts it, with the server's process tree as it was seen."""

    def __init__(self, repository: Path, log: Path):
        self.ports = Ports(free_port(), free_port(), free_port())
        self.log = log
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mistral_export.cli",
                "serve",
                str(repository),
                "--http-port",
                str(self.ports.http),
                "--grpc-port",
                str(self.ports.grpc),
                "--metrics-port",
                str(self.ports.metrics),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
        )
        self.tree: dict[int, str] = {}

    def look(self) -> dict[int, str]:
        self.tree.update(process_tree(self.process.pid))
        return self.tree

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"serve exited while waiting for {what}:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.log.read_text()}"
            self.look()
            time.sleep(0.05)
        self.look()

    def ready(self, path: str = "/v2/health/ready") -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.http}{path}", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def stub(self) -> int:
        """The model's Python stub: the process running the stub program (the backend also runs short shell
        commands naming it)."""
        return next(
            pid
            for pid, command in self.look().items()
            if command.split(" ")[0].endswith("/triton_python_backend_stub") and running(pid)
        )

    def exited_within(self, bound: float, since: float) -> int:
        """serve's exit code; it exited BOUND seconds after SINCE at most, and left no process of its tree."""
        try:
            code = self.process.wait(timeout=max(0.0, since + bound - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve still runs {bound:.0f} s after the signal:\n{self.log.read_text()}")
        deadline = time.monotonic() + 5  # the kernel tears a killed process down asynchronously
        while [pid for pid in self.tree if running(pid)] and time.monotonic() < deadline:
            time.sleep(0.05)
        left = {pid: command for pid, command in self.tree.items() if running(pid)}
        assert not left, f"left running after serve exited: {left}"
        return code

    def kill(self) -> None:
        """Whatever a failed test left: SIGKILL to serve and every process of its tree (by pid)."""
        for pid in [self.process.pid, *self.look()]:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def serve(repository, tmp_path):
    started = []

    def start() -> Serve:
        started.append(Serve(repository, tmp_path / f"serve{len(started)}.log"))
        return started[-1]

    yield start
    for server in started:
        server.kill()


def grpc_inputs(prompt: str, max_tokens: int):
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
    tokens = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
    tokens.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    flag = grpcclient.InferInput("stream", [1, 1], "BOOL")
    flag.set_data_from_numpy(np.array([[True]]))
    return [text, tokens, flag]


class GrpcStream(threading.Thread):
    """One streamed gRPC request; `pieces`, and how it ended: `final` (a final response) or `error`."""

    def __init__(self, ports: Ports, prompt: str, max_tokens: int):
        super().__init__(daemon=True)
        self.ports, self.prompt, self.max_tokens = ports, prompt, max_tokens
        self.pieces: list[str] = []
        self.final = False
        self.error: str | None = None
        self.start()

    def run(self) -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.ports.grpc}")
        results = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(MODEL, grpc_inputs(self.prompt, self.max_tokens), enable_empty_final_response=True)
        try:
            while True:
                result, error = results.get(timeout=60)  # a stream left without an end is the bug this looks for
                if error is not None:
                    self.error = str(error)
                    return
                output = result.as_numpy("text_output")
                if output is not None:
                    self.pieces.append(output.reshape(-1)[0].decode())
                if result.get_response().parameters["triton_final_response"].bool_param:
                    self.final = True
                    return
        except queue.Empty:
            return
        finally:
            client.stop_stream()
            client.close()


class HttpStream(threading.Thread):
    """One request to HTTP generate_stream (server-sent events); `error`: an error event, or a broken response."""

    def __init__(self, ports: Ports, prompt: str, max_tokens: int):
        super().__init__(daemon=True)
        self.ports, self.prompt, self.max_tokens = ports, prompt, max_tokens
        self.pieces: list[str] = []
        self.error: str | None = None
        self.start()

    def run(self) -> None:
        body = json.dumps({"text_input": self.prompt, "max_tokens": self.max_tokens, "stream": True}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports.http}/v2/models/{MODEL}/generate_stream",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                for line in response:
                    if line.startswith(b"data: "):
                        event = json.loads(line[len(b"data: ") :])
                        if "error" in event:
                            self.error = event["error"]
                            return
                        self.pieces.append(event["text_output"])
        except (OSError, urllib.error.HTTPError, ValueError) as exc:  # IncompleteRead is a ValueError
            self.error = repr(exc)


def test_sigterm_before_ready_stops_server_and_stub(serve):
    server = serve()
    server.wait_for(lambda: any("tritonserver" in c for c in server.tree.values()), 120, "tritonserver to start")
    assert not server.ready()  # it is loading the model
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.exited_within(EXIT_BOUND_S, signalled) == 0
    assert any("tritonserver" in c for c in server.tree.values())


def test_sigterm_when_idle_stops_server_and_stub(serve):
    server = serve()
    server.wait_for(server.ready, 120, "the server to be ready")
    assert server.stub()
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.exited_within(EXIT_BOUND_S, signalled) == 0
    assert "stopped tritonserver" in server.log.read_text()


def test_sigterm_mid_stream_ends_every_stream_with_an_error_then_a_second_sigterm(serve):
    """Streams far longer than a shutdown lets them run, over gRPC and HTTP, cut by SIGTERM: each client gets an
    error (gRPC: an error response; HTTP: an SSE error event), never a stream that just stops. A second SIGTERM
    then (a user pressing Ctrl-C again) stops what is left at once."""
    server = serve()
    server.wait_for(server.ready, 120, "the server to be ready")
    streams = [GrpcStream(server.ports, PROMPTS[i], LONG) for i in range(3)]
    streams += [HttpStream(server.ports, PROMPTS[3 + i], LONG) for i in range(2)]
    server.wait_for(lambda: all(len(s.pieces) >= 3 for s in streams), 120, "every stream to be under way")
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    for stream in streams:
        stream.join(EXIT_BOUND_S)
        assert not stream.is_alive(), f"{type(stream).__name__} got neither an end nor an error"
    for stream in streams:  # the model's own error, sent before the server goes (not a connection reset)
        assert stream.error is not None and "the server is shutting down: generation cut after" in stream.error, (
            type(stream).__name__,
            stream.error,
        )
        assert len(stream.pieces) < LONG
    assert server.process.poll() is None  # still shutting down (the model unloads): a second SIGTERM ends it now
    server.process.send_signal(signal.SIGTERM)
    assert server.exited_within(EXIT_BOUND_S, signalled) == 0


def test_python_stub_killed_mid_request_fails_the_request_and_stops_serve(serve):
    """The chosen behaviour (deploy/server.py): a dead stub's requests error, the model stops being ready, and serve
    exits 1 saying which stub died (a supervisor restarts it whole). Triton itself sometimes aborts when a stub dies
    mid-request (a lock the stub held in shared memory): serve says the same then."""
    server = serve()
    server.wait_for(server.ready, 120, "the server to be ready")
    stream = GrpcStream(server.ports, PROMPTS[0], LONG)
    server.wait_for(lambda: len(stream.pieces) >= 3, 60, "the stream to be under way")
    stub = server.stub()
    killed = time.monotonic()
    os.kill(stub, signal.SIGKILL)
    stream.join(EXIT_BOUND_S)
    assert not stream.is_alive() and stream.error is not None and not stream.final, stream.error
    deadline = time.monotonic() + EXIT_BOUND_S
    while server.ready(f"/v2/models/{MODEL}/ready") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.ready(f"/v2/models/{MODEL}/ready")
    assert server.exited_within(EXIT_BOUND_S, killed) == 1
    errors = [line for line in server.log.read_text().splitlines() if line.startswith("error:")]
    assert errors and "Python backend stub" in errors[0] and f"(pid {stub}) died" in errors[0], errors
