"""Triton Python-backend model (BLS): text generation driving the TensorRT engine model NAME_engine.

Written into the model repository as NAME/1/model.py by `mistral-export package` (TensorRT layout).
Each request becomes one sequence of the engine model under its own correlation ID: prefill chunks,
then one decode request per token, each carrying the sequence's position (past_len); Triton keeps the
sequence's rolling cache as implicit state between them, and the engine model's sequence batcher
(oldest strategy) batches the steps of concurrent sequences in flight. Decoupled: each request runs
in its own thread and streams its tokens.
"""

import itertools
import json
import os
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mistral_export.deploy.generation import Generation, Limits, RequestError
from mistral_export.deploy.triton_python import LlmMetrics, TritonSink, parse_triton_request, string_parameters
from mistral_export.engines.artifacts import read_engine
from mistral_export.model.tokenizer import load_tokenizer

START = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END


class TritonPythonModel:
    def initialize(self, args):
        parameters = string_parameters(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        self.engine_model = parameters["engine_model"]
        self.prefill_chunk = int(parameters["prefill_chunk"])
        self.tokenizer = load_tokenizer(folder)
        self.limits = Limits.from_engine(read_engine(folder))
        # Correlation IDs unique across this model's instances (each its own process).
        self._ids = itertools.count((os.getpid() << 32) + 1)
        self._lock = threading.Lock()
        self.metrics = LlmMetrics(args)
        # The engine model (packaged with this model's max_batch and instances) holds max_batch sequences per
        # instance (their implicit-state cache slots); the others wait in its sequence batcher's queue, out of
        # this model's sight: counted here as the excess.
        config = json.loads(args["model_config"])
        instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [{}]))
        self.slots = int(config["max_batch_size"]) * instances
        self._in_flight = 0
        self._report(0)

    def execute(self, requests):
        for request in requests:
            sink = TritonSink(request.get_response_sender())
            try:
                generate = parse_triton_request(request, self.tokenizer, self.limits)
                generation = Generation(generate, self.tokenizer, sink, self.metrics)
            except RequestError as exc:
                sink.fail(str(exc))
                continue
            threading.Thread(target=self._generate, args=(generation,), daemon=True).start()
        return None

    def _report(self, change: int) -> None:
        with self._lock:
            self._in_flight += change
            self.metrics.sequences(min(self._in_flight, self.slots), max(0, self._in_flight - self.slots), self.slots)

    def _step(self, sequence: int, ids: list[int], past_len: int, flags: int) -> np.ndarray:
        request = pb_utils.InferenceRequest(
            model_name=self.engine_model, requested_output_names=["logits"],
            inputs=[pb_utils.Tensor("input_ids", np.array([ids], dtype=np.int64)),
                    pb_utils.Tensor("past_len", np.array([[past_len]], dtype=np.int64))],
            correlation_id=sequence, flags=flags,
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0))
        response = request.exec()
        if response.has_error():
            raise RuntimeError(response.error().message())
        return pb_utils.get_output_tensor_by_name(response, "logits").as_numpy()[0, -1].astype(np.float32)

    def _generate(self, generation: Generation) -> None:
        with self._lock:
            sequence = next(self._ids)
        self._report(+1)
        prompt = generation.request.prompt_ids
        try:
            for start in range(0, len(prompt), self.prefill_chunk):
                logits = self._step(sequence, prompt[start:start + self.prefill_chunk], start, START if start == 0 else 0)
            while not generation.push(generation.choose(logits)):
                if generation.sink.cancelled():
                    generation.fail("the client cancelled the request")
                    break
                logits = self._step(sequence, [generation.tokens[-1]], generation.position - 1, 0)
        except Exception as exc:  # the engine model's error goes to this request's client
            generation.fail(f"inference failed: {exc}")
        finally:  # frees the sequence's slot and state in the engine model (its output is not needed)
            try:
                self._step(sequence, [generation.tokens[-1] if generation.tokens else prompt[-1]],
                           generation.position - 1 if generation.tokens else len(prompt) - 1, END)
            except Exception:
                pass
            self._report(-1)
