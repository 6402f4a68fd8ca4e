"""Triton Python-backend model: text generation on the ONNX Runtime artifact, in-flight batched.

Written into the model repository as NAME/1/model.py by `mistral-export package`. It runs inside
Triton's Python stub, which imports `mistral_export` from the Python environment the server was
started with (`mistral-export serve` puts it first on PATH). The model is decoupled: `execute` hands
each request to the batcher's loop thread and returns; responses stream from that thread.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mistral_export.deploy.generation import INPUTS, OUTPUT, Generation, Limits, RequestError, Sink, parse_request
from mistral_export.deploy.scheduler import InFlightBatcher
from mistral_export.engines.artifacts import Artifact, open_runner, read_engine
from mistral_export.model.tokenizer import load_tokenizer


class TritonSink(Sink):
    def __init__(self, sender):
        self.sender = sender

    def send(self, text: str, final: bool) -> None:
        tensor = pb_utils.Tensor(OUTPUT, np.array([[text.encode("utf-8")]], dtype=np.object_))
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self.sender.send(pb_utils.InferenceResponse(output_tensors=[tensor]), flags=flags)

    def fail(self, message: str) -> None:
        code = pb_utils.TritonError.CANCELLED if self.cancelled() else pb_utils.TritonError.INVALID_ARG
        response = pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
        self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def cancelled(self) -> bool:
        return self.sender.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        artifact = Artifact(folder / parameters["artifact"], read_engine(folder / parameters["artifact"]))
        self.tokenizer = load_tokenizer(folder)
        self.limits = Limits.from_engine(artifact.engine)
        runner = open_runner(artifact, threads=int(parameters.get("threads", "0")) or None)
        self.batcher = InFlightBatcher(runner, max_batch=int(config["max_batch_size"]),
                                       prefill_chunk=int(parameters["prefill_chunk"]))

    def execute(self, requests):
        for request in requests:
            sink = TritonSink(request.get_response_sender())
            inputs = {}
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            try:
                generate = parse_request(inputs, json.loads(request.parameters() or "{}"), self.tokenizer, self.limits)
            except RequestError as exc:
                sink.fail(str(exc))
                continue
            self.batcher.submit(Generation(generate, self.tokenizer, sink))
        return None

    def finalize(self):
        self.batcher.close()
