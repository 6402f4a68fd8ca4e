"""Triton Python-backend model: text generation on the packaged artifact, in-flight batched.

Written into the model repository as NAME/1/model.py by `mistral-export package`, for both layouts. It runs inside
Triton's Python stub, which imports `mistral_export` from the Python environment the server was started with
(`mistral-export serve` puts it first on PATH). The runner is chosen from the packaged artifact.json
(deploy/served.py): the ONNX Runtime artifact on the CPU, or the TensorRT engine built for this instance's GPU, run
in this process with its cache on the GPU. Either way one scheduler (deploy/scheduler.py) batches the requests in
flight over the runner's cache slots. The model is decoupled: `execute` hands each request to the batcher's loop
thread and returns; responses stream from that thread.
"""

import json
import os
from pathlib import Path

import triton_python_backend_utils as pb_utils

from mistral_export.deploy.generation import Generation, Limits, RequestError
from mistral_export.deploy.scheduler import InFlightBatcher
from mistral_export.deploy.served import ARTIFACTS_FOLDER, open_served_runner
from mistral_export.deploy.server import SHUTDOWN_FILE_ENV
from mistral_export.deploy.triton_python import LlmMetrics, TritonSink, parse_triton_request, string_parameters
from mistral_export.model.tokenizer import load_tokenizer


class TritonPythonModel:
    def initialize(self, args):
        parameters = string_parameters(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = load_tokenizer(folder)
        device = int(args["model_instance_device_id"]) if args.get("model_instance_kind") == "GPU" else None
        runner, description = open_served_runner(
            folder / ARTIFACTS_FOLDER, device, threads=int(parameters["threads"]) or None
        )
        self.limits = Limits.of(description)
        self.metrics = LlmMetrics(args)
        slots = int(json.loads(args["model_config"])["max_batch_size"])  # the runner's cache: a sequence per slot
        self.metrics.sequences(0, 0, slots)
        # The shutdown begins when `mistral-export serve` creates its file, or (a server started by hand) when Triton
        # unloads the model: the batcher then ends the running requests with an error instead of letting the
        # shutdown cut their streams silently (deploy/server.py).
        name, version = args["model_name"], args["model_version"]
        announced = Path(os.environ[SHUTDOWN_FILE_ENV]) if os.environ.get(SHUTDOWN_FILE_ENV) else None

        def serving() -> bool:
            return not (announced and announced.exists()) and pb_utils.is_model_ready(name, version)

        self.batcher = InFlightBatcher(
            runner,
            max_batch=slots,
            prefill_chunk=int(parameters["prefill_chunk"]),
            report=lambda running, waiting: self.metrics.sequences(running, waiting, slots),
            serving=serving,
        )

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
