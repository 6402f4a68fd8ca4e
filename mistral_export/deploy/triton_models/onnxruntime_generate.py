"""Triton Python-backend model: text generation on the ONNX Runtime artifact, in-flight batched.

Written into the model repository as NAME/1/model.py by `mistral-export package`. It runs inside
Triton's Python stub, which imports `mistral_export` from the Python environment the server was
started with (`mistral-export serve` puts it first on PATH). The model is decoupled: `execute` hands
each request to the batcher's loop thread and returns; responses stream from that thread.
"""

import json
import os
from pathlib import Path

import triton_python_backend_utils as pb_utils

from mistral_export.deploy.generation import Generation, Limits, RequestError
from mistral_export.deploy.scheduler import InFlightBatcher
from mistral_export.deploy.server import SHUTDOWN_FILE_ENV
from mistral_export.deploy.triton_python import TritonSink, parse_triton_request, string_parameters
from mistral_export.artifacts.description import ArtifactDescription
from mistral_export.runners.onnxruntime import OnnxRuntimeRunner
from mistral_export.model.tokenizer import load_tokenizer


class TritonPythonModel:
    def initialize(self, args):
        parameters = string_parameters(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        artifact = folder / parameters["artifact"]
        self.tokenizer = load_tokenizer(folder)
        self.limits = Limits.of(ArtifactDescription.read(artifact))
        # ONNX Runtime's threads sleep between steps: spinning would take the cores from the server's
        # own threads that send each step's tokens (and, on a shared machine, from other jobs: batch-16
        # steps of the 168M benchmark config took 370 ms instead of 620 ms without spinning, 2 busy cores).
        runner = OnnxRuntimeRunner(artifact, threads=int(parameters["threads"]) or None, spinning=False)
        # The shutdown begins when `mistral-export serve` creates its file, or (a server started by hand) when Triton
        # unloads the model: the batcher then ends the running requests with an error instead of letting the
        # shutdown cut their streams silently (deploy/server.py).
        name, version = args["model_name"], args["model_version"]
        announced = Path(os.environ[SHUTDOWN_FILE_ENV]) if os.environ.get(SHUTDOWN_FILE_ENV) else None

        def serving() -> bool:
            return not (announced and announced.exists()) and pb_utils.is_model_ready(name, version)

        self.batcher = InFlightBatcher(runner, max_batch=int(json.loads(args["model_config"])["max_batch_size"]),
                                       prefill_chunk=int(parameters["prefill_chunk"]), serving=serving)

    def execute(self, requests):
        for request in requests:
            sink = TritonSink(request.get_response_sender())
            try:
                generate = parse_triton_request(request, self.tokenizer, self.limits)
            except RequestError as exc:
                sink.fail(str(exc))
                continue
            self.batcher.submit(Generation(generate, self.tokenizer, sink))
        return None

    def finalize(self):
        self.batcher.close()
