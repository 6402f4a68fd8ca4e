"""Triton Python-backend model: text generation on the ONNX Runtime artifact, in-flight batched.

Written into the model repository as NAME/1/model.py by `mistral-export package`. It runs inside
Triton's Python stub, which imports `mistral_export` from the Python environment the server was
started with (`mistral-export serve` puts it first on PATH). The model is decoupled: `execute` hands
each request to the batcher's loop thread and returns; responses stream from that thread.
"""

import json
from pathlib import Path

from mistral_export.deploy.generation import Generation, Limits, RequestError
from mistral_export.deploy.scheduler import InFlightBatcher
from mistral_export.deploy.triton_python import LlmMetrics, TritonSink, parse_triton_request, string_parameters
from mistral_export.engines.artifacts import read_engine
from mistral_export.engines.onnxruntime_runner import OnnxRuntimeRunner
from mistral_export.model.tokenizer import load_tokenizer


class TritonPythonModel:
    def initialize(self, args):
        parameters = string_parameters(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        artifact = folder / parameters["artifact"]
        self.tokenizer = load_tokenizer(folder)
        self.limits = Limits.from_engine(read_engine(artifact))
        # ONNX Runtime's threads sleep between steps: spinning would take the cores from the server's
        # own threads that send each step's tokens (and, on a shared machine, from other jobs: batch-16
        # steps of the 168M benchmark config took 370 ms instead of 620 ms without spinning, 2 busy cores).
        runner = OnnxRuntimeRunner(artifact / "model.onnx", threads=int(parameters["threads"]) or None, spinning=False)
        self.metrics = LlmMetrics(args)
        slots = int(json.loads(args["model_config"])["max_batch_size"])  # the runner's cache: a sequence per slot
        self.metrics.sequences(0, 0, slots)
        self.batcher = InFlightBatcher(runner, max_batch=slots, prefill_chunk=int(parameters["prefill_chunk"]),
                                       report=lambda running, waiting: self.metrics.sequences(running, waiting, slots))

    def execute(self, requests):
        for request in requests:
            sink = TritonSink(request.get_response_sender())
            try:
                generate = parse_triton_request(request, self.tokenizer, self.limits)
            except RequestError as exc:
                sink.fail(str(exc))
                continue
            self.batcher.submit(Generation(generate, self.tokenizer, sink, self.metrics))
        return None

    def finalize(self):
        self.batcher.close()
