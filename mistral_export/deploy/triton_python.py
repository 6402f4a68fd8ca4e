"""What both Python-backend models share: reading a request's inputs, and the response sender as a Sink.

Importable only inside Triton's Python stub (triton_python_backend_utils exists nowhere else).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from mistral_export.deploy.generation import INPUTS, OUTPUT, GenerateRequest, Limits, Sink, parse_request


class TritonSink(Sink):
    def __init__(self, sender):
        self.sender = sender

    def send(self, text: str, final: bool) -> None:
        tensor = pb_utils.Tensor(OUTPUT, np.array([[text.encode("utf-8")]], dtype=np.object_))
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self.sender.send(pb_utils.InferenceResponse(output_tensors=[tensor]), flags=flags)

    def fail(self, message: str, unavailable: bool = False) -> None:
        code = pb_utils.TritonError.CANCELLED if self.cancelled() else \
            pb_utils.TritonError.UNAVAILABLE if unavailable else pb_utils.TritonError.INVALID_ARG
        response = pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
        self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def cancelled(self) -> bool:
        return self.sender.is_cancelled()


def parse_triton_request(request, tokenizer, limits: Limits) -> GenerateRequest:
    """The request's text-interface inputs (generation.parse_request raises RequestError for a bad one)."""
    inputs = {}
    for name in INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            inputs[name] = tensor.as_numpy()
    return parse_request(inputs, json.loads(request.parameters() or "{}"), tokenizer, limits)


def string_parameters(model_config: str) -> dict[str, str]:
    return {k: v["string_value"] for k, v in json.loads(model_config).get("parameters", {}).items()}
