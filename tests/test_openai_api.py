"""`mistral-export serve REPO --openai-port P` (the real command, Triton and the frontend on 127.0.0.1, free ports,
one server for the module) answered by the official `openai` client: completions and chat, streamed and not,
against the eager model's greedy text; usage and finish_reason; stop strings; errors in OpenAI's shape; the LLM
metrics on Triton's metrics endpoint; SIGTERM leaves no process behind. Chat templates against transformers'."""

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from mistral_export.deploy.chat_template import ChatTemplateError, load_chat_template
from mistral_export.deploy.kubernetes import WAITING_METRIC
from mistral_export.deploy.repository import package
from mistral_export.deploy.server import free_port
from mistral_export.model.checkpoint import load_model
from mistral_export.model.config import TINY_DIR
from mistral_export.model.tokenizer import load_tokenizer
from mistral_export.runners.base import EagerRunner, greedy_tokens

from helpers import PROMPTS

openai = pytest.importorskip("openai", reason="the dev extra (openai client) is not installed")
pytest.importorskip("fastapi", reason="the deploy extra (fastapi) is not installed")
pytest.importorskip("pytriton", reason="the deploy extra (nvidia-pytriton: the server) is not installed")

MODEL = "tiny"
LONG_PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n" * 3
CLI = Path(sys.executable).parent / "mistral-export"


@functools.cache
def eager_ids(prompt: str, max_tokens: int) -> tuple[int, ...]:
    """The eager model's greedy continuation (token ids, up to EOS), on one thread."""
    tokenizer = load_tokenizer(TINY_DIR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tuple(
            greedy_tokens(
                EagerRunner(load_model("tiny")), tokenizer.encode(prompt), max_tokens, stop_id=tokenizer.eos_id
            )
        )
    finally:
        torch.set_num_threads(threads)


def eager_text(prompt: str, max_tokens: int) -> str:
    return load_tokenizer(TINY_DIR).decode(list(eager_ids(prompt, max_tokens)))


def mistral_chat(user: str) -> str:
    """Mistral's instruct format for one user message, written out here (BOS is the tokenizer's)."""
    return f"[INST] {user} [/INST]"


def processes_using(path: Path) -> list[str]:
    """Command lines of the running processes that name PATH (tritonserver, its Python stubs)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if entry.name.isdigit() and str(path) in command and state != "Z":
            found.append(f"{entry.name}: {command}")
    return found


@pytest.fixture(scope="module")
def served(tiny_build, tmp_path_factory):
    """(OpenAI base URL, metrics URL) of `mistral-export serve` on a packaged tiny model."""
    repository = tmp_path_factory.mktemp("openai-repository").resolve()
    package(tiny_build, repository, name=MODEL, max_batch=8)
    http, grpc, metrics, api = (free_port() for _ in range(4))
    log_file = open(repository.parent / "serve.log", "w")
    process = subprocess.Popen(
        [
            str(CLI),
            "serve",
            str(repository),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
            "--openai-port",
            str(api),
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{api}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (repository.parent / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "serve was not ready after 120 s"
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        yield base, f"http://127.0.0.1:{metrics}/metrics"
        assert process.poll() is None, "serve died during the tests"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        finally:
            log_file.close()
    log = (repository.parent / "serve.log").read_text()
    log_tail = log[-3000:]
    assert code == 0, log_tail
    assert "Non-graceful termination" not in log, log_tail  # every model unloaded (none stuck until Triton's timeout)
    assert processes_using(repository) == [], log_tail  # tritonserver and its Python stubs are gone too


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=served[0], api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_models_and_completion_equal_eager_greedy_past_w(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    tokenizer = load_tokenizer(TINY_DIR)
    prompt_tokens = len(tokenizer.encode(LONG_PROMPT))
    assert prompt_tokens + 80 > 2 * 64  # past twice the window
    completion = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=80, temperature=0)
    expected = eager_ids(LONG_PROMPT, 80)
    assert completion.choices[0].text == eager_text(LONG_PROMPT, 80)
    assert completion.choices[0].finish_reason == ("stop" if expected[-1] == tokenizer.eos_id else "length")
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        prompt_tokens,
        len(expected),
        prompt_tokens + len(expected),
    )


def test_chat_streams_and_matches_the_unstreamed_answer(client):
    user = "Write a function that reads a config file."
    expected = eager_text(mistral_chat(user), 30)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": user}],
        max_tokens=30,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) > 5  # streamed, not one piece
    assert "".join(contents) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(load_tokenizer(TINY_DIR).encode(mistral_chat(user)))
    assert usage.completion_tokens == len(eager_ids(mistral_chat(user), 30))
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": user}], max_tokens=30, temperature=0
    )
    assert answer.choices[0].message.content == expected and answer.usage == usage


def test_stop_ends_the_text_before_the_stop_string(client):
    full = eager_text(PROMPTS[0], 40)
    stop = full[12:15]  # a string the greedy text reaches; the text must end right before its first occurrence
    assert stop.strip() and full.index(stop) < len(full) - 3
    expected = full[: full.index(stop)]
    completion = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop, "never-generated"]
    )
    assert (completion.choices[0].text, completion.choices[0].finish_reason) == (expected, "stop")
    assert completion.usage.completion_tokens < 40
    pieces = list(
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=stop, stream=True)
    )
    assert "".join(p.choices[0].text for p in pieces) == expected
    assert pieces[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "case, call, error, message",
    [
        (
            "max_tokens 0 (the model refuses)",
            dict(max_tokens=0),
            openai.BadRequestError,
            "max_tokens must be at least 1",
        ),
        (
            "prompt over the context",
            dict(prompt="x = 1\n" * 1500),
            openai.BadRequestError,
            "longer than this model allows",
        ),
        ("n 2", dict(n=2), openai.BadRequestError, "n must be 1"),
        ("wrong type", dict(extra_body={"temperature": "hot"}), openai.BadRequestError, "temperature"),
        (
            "min_tokens over max_tokens",
            dict(extra_body={"min_tokens": 20}),
            openai.BadRequestError,
            "min_tokens must be",
        ),
        ("unknown model", dict(model="gpt-4"), openai.NotFoundError, "does not exist"),
    ],
)
def test_bad_request_gets_an_openai_error_and_the_server_serves_on(client, case, call, error, message):
    arguments = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0) | call
    with pytest.raises(error) as failure:
        client.completions.create(**arguments)
    assert message in failure.value.body["message"] and failure.value.body["type"] == "invalid_request_error"
    completion = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    assert completion.choices[0].text == eager_text(PROMPTS[1], 12)


def test_eight_concurrent_streamed_chats_each_get_their_own_text(client):
    cases = [(f"{PROMPTS[i]} (task {i})", 8 + 3 * i) for i in range(8)]
    results: list = [None] * 8

    def chat(i):
        user, max_tokens = cases[i]
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": user}], max_tokens=max_tokens, temperature=0, stream=True
        )
        results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for (user, max_tokens), text in zip(cases, results, strict=True):
        assert text == eager_text(mistral_chat(user), max_tokens), user


def test_client_leaving_mid_stream_frees_its_sequence(client, served):
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=3000, temperature=0, stream=True)
    pieces = [next(iter(stream)).choices[0].text for _ in range(3)]
    assert len(pieces) == 3 and metric_values(served[1], "mistral_export_running_sequences") == 1
    stream.close()  # the connection closes: the frontend cancels the request in Triton
    deadline = time.monotonic() + 30
    while metric_values(served[1], "mistral_export_running_sequences") != 0:
        assert time.monotonic() < deadline, "the cancelled sequence still holds its slot"
        time.sleep(0.1)
    completion = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=20, temperature=0)
    assert completion.choices[0].text == eager_text(PROMPTS[4], 20)


def metric_values(url: str, name: str) -> float:
    """The sum over label sets of a metric's samples named NAME."""
    with urllib.request.urlopen(url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{"))


def test_metrics_endpoint_counts_the_generate_models_tokens(client, served):
    metrics = served[1]
    before = {
        n: metric_values(metrics, n)
        for n in (
            "mistral_export_time_to_first_token_seconds_count",
            "mistral_export_inter_token_latency_seconds_count",
            "mistral_export_generated_tokens_total",
        )
    }
    completion = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=20, temperature=0)
    tokens = completion.usage.completion_tokens
    after = {n: metric_values(metrics, n) for n in before}
    assert (
        after["mistral_export_time_to_first_token_seconds_count"]
        - before["mistral_export_time_to_first_token_seconds_count"]
        == 1
    )
    assert (
        after["mistral_export_inter_token_latency_seconds_count"]
        - before["mistral_export_inter_token_latency_seconds_count"]
        == tokens - 1
    )
    assert after["mistral_export_generated_tokens_total"] - before["mistral_export_generated_tokens_total"] == tokens
    assert metric_values(metrics, "mistral_export_time_to_first_token_seconds_sum") > 0
    assert metric_values(metrics, "mistral_export_cache_slots") == 8  # --max-batch 8: one slot per sequence
    assert metric_values(metrics, "mistral_export_running_sequences") == 0  # all answered
    assert metric_values(metrics, WAITING_METRIC) == 0  # what the Kubernetes autoscaler reads


# --- chat templates (no server) ----------------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "A joke?"},
]


def test_default_chat_template_is_mistrals_instruct_format(tmp_path):
    template = load_chat_template(tmp_path)  # no tokenizer_config.json
    assert template.render(MESSAGES) == "[INST] Be brief.\n\nHi [/INST]Hello.</s>[INST] A joke? [/INST]"
    with pytest.raises(ChatTemplateError, match="alternate"):
        template.render([{"role": "assistant", "content": "x"}])


def test_checkpoint_chat_template_renders_as_transformers_does(tmp_path):
    transformers = pytest.importorskip("transformers")
    source = (
        "{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>\n"
        "{% else %}{{ bos_token if loop.index0 == 1 else '' }}<|{{ m['role'] }}|>\n  {{ m['content'] | trim }}\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": source, "bos_token": "<s>", "eos_token": {"content": "</s>"}})
    )
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(TINY_DIR / "tokenizer.json"), bos_token="<s>", eos_token="</s>", chat_template=source
    )
    expected = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert load_chat_template(tmp_path).render(MESSAGES) == expected


def test_package_carries_the_checkpoint_chat_template(tiny_build, tmp_path):
    (tiny_build / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!"}))
    try:
        package(tiny_build, tmp_path / "repo", name=MODEL)
    finally:
        os.unlink(tiny_build / "tokenizer_config.json")
    assert load_chat_template(tmp_path / "repo" / MODEL / "1").render([{"role": "user", "content": "hey"}]) == "hey!"
