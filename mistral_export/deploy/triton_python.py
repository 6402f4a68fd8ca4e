"""What both Python-backend models share: reading a request's inputs, the response sender as a Sink, and
the LLM metrics they put on Triton's metrics endpoint.

Importable only inside Triton's Python stub (triton_python_backend_utils exists nowhere else).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from mistral_export.deploy.generation import (
    FINISH_OUTPUTS,
    INPUTS,
    OUTPUT,
    Finish,
    GenerateRequest,
    Limits,
    Sink,
    TokenObserver,
    parse_request,
)

# Seconds; from a few ms (a small model's step) to a long prefill queue.
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class TritonSink(Sink):
    def __init__(self, sender):
        self.sender = sender

    def send(self, text: str, final: Finish | None) -> None:
        tensors = [pb_utils.Tensor(OUTPUT, np.array([[text.encode("utf-8")]], dtype=np.object_))]
        if final is not None:
            values = {
                "finish_reason": final.reason.encode(),
                "prompt_tokens": final.prompt_tokens,
                "completion_tokens": final.completion_tokens,
            }
            tensors += [
                pb_utils.Tensor(n, np.array([[values[n]]], np.object_ if t == "TYPE_STRING" else np.int32))
                for n, t in FINISH_OUTPUTS.items()
            ]
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final is not None else 0
        self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=flags)

    def fail(self, message: str, unavailable: bool = False) -> None:
        code = (
            pb_utils.TritonError.CANCELLED
            if self.cancelled()
            else pb_utils.TritonError.UNAVAILABLE
            if unavailable
            else pb_utils.TritonError.INVALID_ARG
        )
        response = pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
        self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def cancelled(self) -> bool:
        return self.sender.is_cancelled()


class LlmMetrics(TokenObserver):
    """The numbers an LLM server is judged by, through the Python backend's custom metrics API (they appear
    on Triton's metrics endpoint beside its own request counts and queue times, labelled with the model).

    Sequences: running (holding a cache slot, prefilling or decoding) and waiting (queued for a slot);
    cache slots: in use and in all. Each model instance (its own stub process) reports its own, with a
    `model_instance` label, so that Prometheus sums them.
    """

    def __init__(self, args: dict):
        labels = {"model": args["model_name"], "model_instance": args["model_instance_name"]}

        def family(name, description, kind):
            self._families.append(pb_utils.MetricFamily(name=name, description=description, kind=kind))
            return self._families[-1]

        self._families = []  # kept alive: a metric outliving its family is an error in the stub
        histogram, counter, gauge = (
            pb_utils.MetricFamily.HISTOGRAM,
            pb_utils.MetricFamily.COUNTER,
            pb_utils.MetricFamily.GAUGE,
        )
        self.ttft = family(
            "mistral_export_time_to_first_token_seconds",
            "Time from a request's arrival at the model to its first generated token",
            histogram,
        ).Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.inter_token = family(
            "mistral_export_inter_token_latency_seconds", "Time between two generated tokens of a sequence", histogram
        ).Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.tokens = family("mistral_export_generated_tokens_total", "Tokens generated", counter).Metric(labels=labels)
        self.running = family(
            "mistral_export_running_sequences", "Sequences holding a cache slot (prefill or decode)", gauge
        ).Metric(labels=labels)
        self.waiting = family("mistral_export_waiting_sequences", "Sequences waiting for a cache slot", gauge).Metric(
            labels=labels
        )
        self.slots_used = family(
            "mistral_export_cache_slots_in_use", "KV-cache slots (one per sequence) in use", gauge
        ).Metric(labels=labels)
        self.slots = family("mistral_export_cache_slots", "KV-cache slots (one per sequence) in all", gauge).Metric(
            labels=labels
        )

    def token(self, first: bool, seconds: float) -> None:
        (self.ttft if first else self.inter_token).observe(seconds)
        self.tokens.increment(1)

    def sequences(self, running: int, waiting: int, slots: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.slots_used.set(min(running, slots))
        if self.slots.value() != slots:
            self.slots.set(slots)


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
