"""Deploy without a server: in-flight batching over runner slots, the text interface's rules, and the
model repository layout (config.pbtxt checked with Triton's proto; the artifact the generate model serves chosen
from the packaged artifact.json; a TensorRT engine's profile limits checked against the repository's)."""

import threading
import time

import numpy as np
import pytest
import torch

from mistral_export.artifacts.folder import find_artifacts, tensorrt_dir
from mistral_export.artifacts.gpu import GpuDescription
from mistral_export.deploy.configs import parse_config
from mistral_export.deploy.generation import (
    Generation,
    IncrementalDetokenizer,
    Limits,
    RequestError,
    Sink,
    parse_request,
)
from mistral_export.deploy.repository import TEMPLATES, package
from mistral_export.deploy.scheduler import InFlightBatcher
from mistral_export.deploy.served import ARTIFACTS_FOLDER, served_artifact
from mistral_export.engines.tensorrt.builder import EngineOptions, tensorrt_description
from mistral_export.errors import MistralExportError
from mistral_export.model.config import TINY_DIR
from mistral_export.model.tokenizer import load_tokenizer
from mistral_export.runners import open_runner

from helpers import PROMPTS, eager_text

pytest.importorskip("tritonclient.grpc", reason="the deploy extra (tritonclient) is not installed")
from tritonclient.grpc import model_config_pb2  # noqa: E402

from mistral_export.folder_lock import LOCK_FILE  # noqa: E402


class Collector(Sink):
    """The test's end of a generation: what a client would receive."""

    def __init__(self, cancel_after: int | None = None):
        self.pieces: list[str] = []
        self.final = threading.Event()
        self.error: str | None = None
        self.unavailable = False
        self.cancel_after = cancel_after

    def send(self, text, final):
        self.pieces.append(text)
        if final:
            self.final.set()

    def fail(self, message, unavailable=False):
        self.error = message
        self.unavailable = unavailable
        self.final.set()

    def cancelled(self):
        return self.cancel_after is not None and len(self.pieces) >= self.cancel_after


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_DIR)


NO_LIMIT = Limits(4096, True)


def request(tokenizer, prompt, max_tokens, limits=NO_LIMIT, **inputs):
    tensors = {
        "text_input": np.array([[prompt.encode()]], dtype=object),
        "max_tokens": np.array([[max_tokens]], np.int32),
    }
    tensors.update({k: np.asarray(v) for k, v in inputs.items()})
    return parse_request(tensors, {}, tokenizer, limits)


def test_in_flight_batching_matches_eager(tiny_build, tokenizer):
    """12 requests arriving while others decode, 4 slots (so requests wait, join and leave; the last
    decoding sequence moves into a freed slot), prompts prefilled in chunks of 24 tokens (some prompts
    and generations pass 2W = 128): each stream is exactly its own eager greedy continuation."""
    runner = open_runner(find_artifacts(tiny_build)[0], threads=2)
    batcher = InFlightBatcher(runner, max_batch=4, prefill_chunk=24)
    cases = [(PROMPTS[i % 8] * (1 + 11 * (i % 3 == 2)), 4 + 6 * i) for i in range(12)]
    sinks = []
    try:
        for i, (prompt, max_tokens) in enumerate(cases):
            sinks.append(Collector())
            batcher.submit(Generation(request(tokenizer, prompt, max_tokens, stream=[[True]]), tokenizer, sinks[-1]))
            time.sleep(0.01 * (i % 3))
        assert all(s.final.wait(300) for s in sinks)
    finally:
        batcher.close()
    assert any(len(tokenizer.encode(p)) + n > 128 for p, n in cases)
    for (prompt, max_tokens), sink in zip(cases, sinks):
        assert sink.error is None
        assert "".join(sink.pieces) == eager_text(prompt, max_tokens), prompt


@pytest.mark.parametrize(
    "backend", ["onnxruntime", pytest.param("tensorrt", marks=[pytest.mark.tensorrt, pytest.mark.gpu])]
)
def test_runner_slots_keep_each_sequence_apart(tiny_build, tmp_path, backend):
    """A runner's slot steps (OnnxRuntimeRunner; TensorRTRunner where TensorRT runs) against one-sequence steps: a
    prefill (in chunks) in the slot after the decoding ones between decode steps, a sequence leaving (the last one
    moves into its slot, the prefilling one moves down behind it): every logits row matches the same sequence run
    alone."""
    if backend == "tensorrt":
        from mistral_export.pipeline.build import build

        artifact = find_artifacts(build("tiny", tmp_path / "build", backend="tensorrt"), backend="tensorrt")[0]
    else:
        artifact = find_artifacts(tiny_build)[0]
    runner, alone = open_runner(artifact, threads=2), open_runner(artifact, threads=2)
    g = torch.Generator().manual_seed(0)
    seqs = {name: torch.randint(3, 2048, (length,), generator=g) for name, length in (("a", 30), ("b", 30), ("c", 24))}
    reference = {}
    for name, ids in seqs.items():
        alone.reset(1)
        reference[name] = alone.step(ids[None], torch.tensor([0]))[0]
    pos = dict.fromkeys(seqs, 0)

    def prefill(slot, name, n):
        logits = runner.prefill_slot(slot, seqs[name][None, pos[name] : pos[name] + n], torch.tensor([pos[name]]))
        torch.testing.assert_close(logits[0], reference[name][pos[name] : pos[name] + n], atol=1e-4, rtol=0)
        pos[name] += n

    def decode(*names):
        logits = runner.step_slots(
            torch.stack([seqs[n][pos[n] : pos[n] + 1] for n in names]), torch.tensor([pos[n] for n in names])
        )
        for row, name in enumerate(names):
            torch.testing.assert_close(logits[row, 0], reference[name][pos[name]], atol=1e-4, rtol=0)
            pos[name] += 1

    runner.reset(3)
    prefill(0, "a", 10)
    for _ in range(3):  # b prefills in slot 1 in chunks while a decodes in slot 0
        prefill(1, "b", 7)
        decode("a")
    prefill(1, "b", 4)
    prefill(2, "c", 8)  # c starts in slot 2 while a and b decode
    decode("a", "b")
    runner.move_slot(1, 0)  # a leaves: b moves into slot 0, the prefilling c down to slot 1
    runner.move_slot(2, 1)
    decode("b")
    prefill(1, "c", 8)
    for _ in range(3):
        decode("b", "c")


def test_cancelled_request_frees_its_slot(tiny_build, tokenizer):
    runner = open_runner(find_artifacts(tiny_build)[0], threads=2)
    batcher = InFlightBatcher(runner, max_batch=2, prefill_chunk=256)
    gone, kept, later = Collector(cancel_after=2), Collector(), Collector()
    try:
        batcher.submit(Generation(request(tokenizer, PROMPTS[0], 200, stream=[[True]]), tokenizer, gone))
        batcher.submit(Generation(request(tokenizer, PROMPTS[1], 30), tokenizer, kept))
        assert gone.final.wait(120) and kept.final.wait(120)
        batcher.submit(
            Generation(request(tokenizer, PROMPTS[2], 20, exclude_input_in_output=[[True]]), tokenizer, later)
        )
        assert later.final.wait(120)
        assert batcher.active == 0
    finally:
        batcher.close()
    assert "cancelled" in gone.error and len(gone.pieces) == 2
    assert kept.pieces == [PROMPTS[1] + eager_text(PROMPTS[1], 30)]  # one response, prompt included
    assert later.pieces == [eager_text(PROMPTS[2], 20)]


def test_closing_the_batcher_ends_unfinished_requests_with_an_error(tiny_build, tokenizer):
    """What the model's finalize does at shutdown: a generation cut short, and one still waiting, each get an error
    saying so (never a final response that looks complete)."""
    runner = open_runner(find_artifacts(tiny_build)[0], threads=1)
    batcher = InFlightBatcher(runner, max_batch=1, prefill_chunk=256)
    running, waiting = Collector(), Collector()
    batcher.submit(Generation(request(tokenizer, PROMPTS[0], 4000, stream=[[True]]), tokenizer, running))
    batcher.submit(Generation(request(tokenizer, PROMPTS[1], 10, stream=[[True]]), tokenizer, waiting))
    deadline = time.monotonic() + 60
    while len(running.pieces) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    batcher.close()
    assert running.final.is_set() and waiting.final.is_set()
    assert running.unavailable and "shutting down: generation cut after" in running.error
    assert waiting.unavailable and waiting.pieces == [] and "cut after 0 of 10 tokens" in waiting.error
    assert len(running.pieces) < 4000


def test_detokenizer_never_splits_a_character(tokenizer):
    text = "x = 'é€😀 naïve 日本語'  # ünïcödé"
    ids = tokenizer.encode(text, add_bos=False)
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("print("))
    pieces = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if not p) > 0  # some tokens held back: they ended inside a character


def test_sampling_rules(tokenizer):
    vocab = tokenizer.vocab_size
    (word,) = tokenizer.encode(" return", add_bos=False)
    logits = np.zeros(vocab, np.float32)
    logits[tokenizer.eos_id], logits[word], logits[9] = 5.0, 4.0, 3.0
    sink = Collector()
    generation = Generation(request(tokenizer, "a", 3, min_length=[[2]]), tokenizer, sink)
    assert generation.choose(logits) == word  # EOS barred before min_length
    generation.tokens = [word, word]
    assert generation.choose(logits) == tokenizer.eos_id
    generation = Generation(request(tokenizer, "a", 3, bad_words=[[b" return"]], min_length=[[1]]), tokenizer, sink)
    assert generation.request.bad_words_ids == [[word]] and generation.choose(logits) == 9
    draws = [
        Generation(request(tokenizer, "a", 3, temperature=[[1.0]], top_k=[[2]], seed=[[s]]), tokenizer, sink).choose(
            logits
        )
        for s in range(40)
    ]
    assert set(draws) == {tokenizer.eos_id, word}  # top_k 2: only the two most likely
    again = Generation(request(tokenizer, "a", 3, temperature=[[1.0]], top_k=[[2]], seed=[[3]]), tokenizer, sink)
    assert again.choose(logits) == draws[3]  # a seed repeats


def test_stop_words_end_the_generation(tokenizer):
    sink = Collector()
    generation = Generation(request(tokenizer, "a", 50, stop_words=[[b"return"]], stream=[[True]]), tokenizer, sink)
    ids = tokenizer.encode("x = 1\n    return x\n    y = 2", add_bos=False)
    pushed = 0
    while not generation.push(ids[pushed]):
        pushed += 1
    assert "".join(sink.pieces).endswith("return") and sink.final.is_set()


@pytest.mark.parametrize(
    "case, inputs, parameters, message",
    [
        ("empty prompt", {"text_input": [[b""]], "max_tokens": [[4]]}, {}, "text_input is empty"),
        ("max_tokens 0", {"text_input": [[b"x"]], "max_tokens": [[0]]}, {}, "at least 1"),
        ("max_tokens over", {"text_input": [[b"x"]], "max_tokens": [[100]]}, {}, "over the limit 63"),
        ("prompt too long", {"text_input": [[b"x " * 80]], "max_tokens": [[1]]}, {}, "longer than this model allows"),
        (
            "sum too long",
            {"text_input": [[b"x " * 30]], "max_tokens": [[40]]},
            {},
            "exceeds the limit 64 of this model .a model without sliding window",
        ),
        ("unknown parameter", {"text_input": [[b"x"]], "max_tokens": [[4]]}, {"beam_width": 2}, "unknown parameter"),
        ("min_length", {"text_input": [[b"x"]], "max_tokens": [[4]], "min_length": [[5]]}, {}, "min_length"),
    ],
)
def test_bad_requests_are_refused(tokenizer, case, inputs, parameters, message):
    no_window = Limits(max_total_tokens=64, cache_wraps=False)
    with pytest.raises(RequestError, match=message):
        parse_request(
            {k: np.array(v, dtype=object if isinstance(v[0][0], bytes) else None) for k, v in inputs.items()},
            parameters,
            tokenizer,
            no_window,
        )


def test_onnxruntime_repository(tiny_build, tmp_path):
    repository = tmp_path / "repo"
    (written,) = package(tiny_build, repository, max_batch=4, instances=2)
    config = parse_config((written / "config.pbtxt").read_text(), "test")
    assert config.backend == "python" and config.max_batch_size == 4 and config.model_transaction_policy.decoupled
    assert config.instance_group[0].count == 2
    assert [i.name for i in config.input if not i.optional] == ["text_input", "max_tokens"]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    for file in (
        "1/model.py",
        "1/tokenizer.json",
        "1/artifacts/model.ort.onnx",
        "1/artifacts/model.onnx.data",
        "1/artifacts/artifact.json",
    ):
        assert (written / file).is_file(), file
    served = served_artifact(written / "1" / ARTIFACTS_FOLDER, None)  # what the generate model runs: from artifact.json
    assert served.backend == "onnxruntime" and served.folder == written / "1" / ARTIFACTS_FOLDER
    assert "mistral-export serve" in (repository / "README.md").read_text()
    assert not [p for p in repository.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]  # no staging left


def tensorrt_build(tiny_build, out, gpus, options=None):
    """A build folder as the TensorRT build writes it: artifact.json per GPU from the build's own writer, I/O as the
    ONNX graph has it. (No TensorRT here: model.plan is a placeholder that is only copied, never loaded.)"""
    out.mkdir()
    (out / "build.json").write_text((tiny_build / "build.json").read_text())
    (out / "tokenizer.json").write_text((tiny_build / "tokenizer.json").read_text())
    for gpu in gpus:
        folder = tensorrt_dir(out, gpu.folder_name, "fp32")
        folder.mkdir(parents=True)
        (folder / "model.plan").write_bytes(f"placeholder for {gpu.name}: not an engine".encode())
        tensorrt_description(
            tiny_build / "onnx/fp32/model.onnx",
            gpu,
            precision="fp32",
            options=options or EngineOptions(),
            plugin_impl="aot",
            build_seconds=1.0,
            ptx_isa=80,
            cache_copies=(),
        ).write(folder)
    return out


H200 = GpuDescription("NVIDIA H200", "9.0", "11.4.0")
A100 = GpuDescription("NVIDIA A100-SXM4-80GB", "8.0", "11.4.0")


def test_tensorrt_repository(tiny_build, tmp_path):
    """One Python-backend model on the GPU that runs the engine in the server's process (no tensorrt_plan model, no
    implicit state): the engines of both GPUs packaged with their artifact.json, the one for the instance's GPU
    chosen from them."""
    build = tensorrt_build(tiny_build, tmp_path / "build", [H200, A100])
    (written,) = package(build, tmp_path / "repo", name="tiny", max_batch=8)
    assert sorted(p.name for p in (tmp_path / "repo").iterdir() if p.name != LOCK_FILE) == ["README.md", "tiny"]
    config = parse_config((written / "config.pbtxt").read_text(), str(written))
    assert config.backend == "python" and config.model_transaction_policy.decoupled and config.max_batch_size == 8
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert not config.HasField("sequence_batching") and config.platform == ""
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    assert parameters["prefill_chunk"] == "256"
    assert (written / "1/model.py").read_text() == (TEMPLATES / "generate.py").read_text()
    assert (written / "1/tokenizer.json").is_file()
    artifacts = written / "1" / ARTIFACTS_FOLDER
    for gpu in (H200, A100):
        assert (
            artifacts / gpu.folder_name / "model.plan"
        ).read_bytes() == f"placeholder for {gpu.name}: not an engine".encode()
    chosen = served_artifact(artifacts, "9.0")
    assert chosen.backend == "tensorrt" and chosen.folder == artifacts / H200.folder_name
    assert served_artifact(artifacts, "8.0").description.tensorrt.gpu == A100.name
    with pytest.raises(
        MistralExportError, match=r"no engine for this GPU's compute capability 8.9 \(engines for 8.0, 9.0\)"
    ):
        served_artifact(artifacts, "8.9")
    with pytest.raises(MistralExportError, match="need a GPU"):
        served_artifact(artifacts, None)


@pytest.mark.parametrize(
    "max_batch, prefill_chunk, message",
    [
        (8, 64, r"--max-batch 8 \(Triton's max_batch_size\) is larger than the engine's batch limit 4 .*--max-batch 4"),
        (4, 256, r"--prefill-chunk 256 is longer than the engine's longest step 128 .*--max-chunk 128"),
    ],
)
def test_package_refuses_limits_outside_the_engine_profile(tiny_build, tmp_path, max_batch, prefill_chunk, message):
    build = tensorrt_build(tiny_build, tmp_path / "build", [H200], EngineOptions(max_batch=4, max_chunk=128))
    with pytest.raises(MistralExportError, match=message):
        package(build, tmp_path / "repo", max_batch=max_batch, prefill_chunk=prefill_chunk)
    assert not (tmp_path / "repo" / "tiny").exists()
    (written,) = package(build, tmp_path / "repo", max_batch=4, prefill_chunk=128)  # within the profile
    assert parse_config((written / "config.pbtxt").read_text(), "x").max_batch_size == 4


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_served_runner_of_a_tensorrt_repository_is_the_tensorrt_runner(tiny_build, tmp_path):
    """Where TensorRT runs: the generate model's runner for a packaged engine built here is a TensorRTRunner."""
    from mistral_export.deploy.served import open_served_runner
    from mistral_export.pipeline.build import build
    from mistral_export.runners.tensorrt import TensorRTRunner

    out = build("tiny", tmp_path / "build", backend="tensorrt")
    (written,) = package(out, tmp_path / "repo", max_batch=2)
    runner, description = open_served_runner(written / "1" / ARTIFACTS_FOLDER, 0)
    assert isinstance(runner, TensorRTRunner) and description.backend == "tensorrt"


def test_config_the_proto_rejects_is_an_error():
    with pytest.raises(MistralExportError, match="schema rejects"):
        parse_config('name: "x"\nmax_batch_sise: 4\n', "x/config.pbtxt")


def test_cli_package_and_serve(tiny_build, tmp_path):
    from typer.testing import CliRunner

    from mistral_export.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["package", str(tiny_build), "-o", str(tmp_path / "repo"), "--name", "coder"])
    assert result.exit_code == 0 and (tmp_path / "repo" / "coder" / "config.pbtxt").is_file()
    result = runner.invoke(app, ["package", str(tmp_path), "-o", str(tmp_path / "repo")])
    assert result.exit_code == 2 and "error:" in result.output and "build.json" in result.output
    result = runner.invoke(app, ["package", str(tiny_build), "-o", str(tmp_path / "repo"), "--backend", "tensorrt"])
    assert result.exit_code == 2 and "no tensorrt artifact" in result.output
    result = runner.invoke(app, ["serve", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "not a model repository" in result.output


def test_model_template_compiles():
    """The one generate model runs only inside Triton's stub; here at least it compiles."""
    for template in sorted(TEMPLATES.glob("*.py")):
        compile(template.read_text(), str(template), "exec")
    assert {t.name for t in TEMPLATES.glob("*.py")} == {"generate.py"}
