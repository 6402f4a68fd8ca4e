"""The packaged tiny model on a real Triton Inference Server (127.0.0.1, free ports, one server for the module):
greedy text over gRPC streaming, HTTP generate_stream and HTTP generate equals the eager model's; concurrent
clients get their own continuations; bad requests get clean errors and the server keeps serving."""

import json
import queue
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from mistral_export.deploy.repository import package
from mistral_export.deploy.server import Ports, free_port, running_server
from mistral_export.model.config import TINY_DIR
from mistral_export.model.tokenizer import load_tokenizer

from helpers import PROMPTS, eager_text

grpcclient = pytest.importorskip("tritonclient.grpc", reason="the deploy extra (tritonclient) is not installed")
pytest.importorskip("pytriton", reason="the deploy extra (nvidia-pytriton: the server) is not installed")

MODEL = "tiny"
LONG_PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n" * 3


@pytest.fixture(scope="module")
def server(tiny_build, tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    package(tiny_build, repository, name=MODEL, max_batch=8)
    ports = Ports(free_port(), free_port(), free_port())
    with (
        open(repository.parent / "tritonserver.log", "w") as log,
        running_server(repository, ports, log=log) as process,
    ):
        yield ports
        assert process.poll() is None, "the server died during the tests"


def grpc_inputs(prompt: str, max_tokens, stream=True, max_tokens_dtype="INT32"):
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
    tokens = grpcclient.InferInput("max_tokens", [1, 1], max_tokens_dtype)
    tokens.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32 if max_tokens_dtype == "INT32" else np.float32))
    flag = grpcclient.InferInput("stream", [1, 1], "BOOL")
    flag.set_data_from_numpy(np.array([[stream]]))
    return [text, tokens, flag]


def grpc_stream(ports: Ports, prompt: str, max_tokens, cancel_after: int | None = None, **options):
    """(text pieces, error message or None) of one streamed request."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports.grpc}")
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    parameters = options.pop("parameters", None)
    try:
        client.async_stream_infer(
            MODEL, grpc_inputs(prompt, max_tokens, **options), parameters=parameters, enable_empty_final_response=True
        )
        pieces = []
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                return pieces, str(error)
            output = result.as_numpy("text_output")
            if output is not None:
                pieces.append(output.reshape(-1)[0].decode())
            if cancel_after is not None and len(pieces) >= cancel_after:
                client.stop_stream(cancel_requests=True)
                return pieces, None
            if result.get_response().parameters["triton_final_response"].bool_param:
                return pieces, None
    finally:
        client.stop_stream()
        client.close()


def http_post(ports: Ports, endpoint: str, body: dict):
    request = urllib.request.Request(
        f"http://127.0.0.1:{ports.http}/v2/models/{MODEL}/{endpoint}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    return urllib.request.urlopen(request, timeout=120)


def http_stream(ports: Ports, body: dict) -> list[str]:
    with http_post(ports, "generate_stream", body) as response:
        return [json.loads(line[len(b"data: ") :])["text_output"] for line in response if line.startswith(b"data: ")]


def healthy(ports: Ports) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/models/{MODEL}/ready", timeout=10) as response:
        return response.status == 200


def test_grpc_stream_matches_eager_past_2w(server):
    tokenizer = load_tokenizer(TINY_DIR)
    assert len(tokenizer.encode(LONG_PROMPT)) + 80 > 2 * 64
    pieces, error = grpc_stream(server, LONG_PROMPT, 80)
    assert error is None
    assert len(pieces) > 10  # streamed, not one response
    assert "".join(pieces) == eager_text(LONG_PROMPT, 80)


def test_http_generate_stream_and_generate_match_eager(server):
    pieces = http_stream(server, {"text_input": LONG_PROMPT, "max_tokens": 80, "stream": True})
    assert len(pieces) > 10 and "".join(pieces) == eager_text(LONG_PROMPT, 80)
    with http_post(server, "generate", {"text_input": PROMPTS[0], "max_tokens": 40}) as response:
        assert json.loads(response.read())["text_output"] == PROMPTS[0] + eager_text(PROMPTS[0], 40)
    with http_post(
        server, "generate", {"text_input": PROMPTS[0], "max_tokens": 40, "exclude_input_in_output": True}
    ) as response:
        assert json.loads(response.read())["text_output"] == eager_text(PROMPTS[0], 40)


def test_concurrent_clients_get_their_own_continuations(server):
    cases = [(PROMPTS[i] * (1 + 3 * (i % 2)), 6 + 4 * i) for i in range(8)]
    results = [None] * 8

    def client(i):
        results[i] = grpc_stream(server, *cases[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for (prompt, max_tokens), (pieces, error) in zip(cases, results):
        assert error is None and "".join(pieces) == eager_text(prompt, max_tokens), prompt
    assert healthy(server)


@pytest.mark.parametrize(
    "case, prompt, max_tokens, options, message",
    [
        ("empty prompt", "", 8, {}, "text_input is empty"),
        ("max_tokens 0", "x", 0, {}, "max_tokens must be at least 1"),
        ("max_tokens over the limit", "x", 5000, {}, "over the limit 4095"),
        ("wrong datatype", "x", 8, {"max_tokens_dtype": "FP32"}, "expects 'INT32'"),
        ("prompt too long", "x = 1\n" * 1500, 8, {}, "longer than this model allows"),
        ("unknown parameter", "x", 8, {"parameters": {"beam_width": 2}}, "unknown parameter"),
    ],
)
def test_bad_request_is_refused_and_server_keeps_serving(server, case, prompt, max_tokens, options, message):
    pieces, error = grpc_stream(server, prompt, max_tokens, **options)
    assert pieces == [] and error is not None and message in error
    pieces, error = grpc_stream(server, PROMPTS[1], 12)
    assert error is None and "".join(pieces) == eager_text(PROMPTS[1], 12)


def test_http_errors_are_clean(server):
    for body, message in [
        ({"text_input": "x", "max_tokens": 8, "beam_width": 2}, "unknown parameter"),
        ({"text_input": "", "max_tokens": 8}, "text_input is empty"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as failure:
            http_post(server, "generate", body)
        assert message in json.loads(failure.value.read())["error"]


def test_client_disconnecting_mid_stream(server):
    pieces, error = grpc_stream(server, PROMPTS[2], 3000, cancel_after=3)
    assert error is None and len(pieces) == 3
    with http_post(
        server, "generate_stream", {"text_input": PROMPTS[3], "max_tokens": 3000, "stream": True}
    ) as response:
        assert response.readline().startswith(b"data: ")  # then the connection closes mid-stream
    pieces, error = grpc_stream(server, PROMPTS[4], 20)
    assert error is None and "".join(pieces) == eager_text(PROMPTS[4], 20)
    assert healthy(server)
