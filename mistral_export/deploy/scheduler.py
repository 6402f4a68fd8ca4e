"""In-flight batching over a runner's cache slots (runners/onnxruntime.py, runners/tensorrt.py: step_slots,
prefill_slot, move_slot).

One loop thread owns the runner. Each turn it prefills waiting requests, up to `prefill_chunk` prompt
tokens in all (each in the free slot right after the decoding ones; a longer prompt continues over the
next turns), and then runs one decode step that serves every decoding sequence at its own position
(the graph takes past_len per sequence). A request whose prefill is done
joins the decoding batch; a finished or cancelled one leaves it, and the last decoding sequence moves
into its slot, so the decoding sequences always sit in slots 0..n-1 and a step binds them as one block.
Requests beyond the batch wait in arrival order.

Shutdown: Triton unloads a model only once its requests are done, and after its exit timeout it exits with their
streams open (an HTTP stream then simply stops: its client cannot tell it from a finished one). So while requests
run, the loop asks `serving()` a few times a second (the generate model answers from `mistral-export serve`'s
announcement of the shutdown and the model's readiness), and when it turns false ends every request not finished
yet with an error saying so; `close` does the same for whatever is left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from mistral_export.deploy.generation import Generation

log = logging.getLogger(__name__)

SERVING_CHECK_S = 0.25  # how often a running batch asks whether the server is still serving


class InFlightBatcher:
    def __init__(
        self,
        runner,
        max_batch: int,
        prefill_chunk: int,
        report: Callable[[int, int], None] = lambda running, waiting: None,
        serving: Callable[[], bool] = lambda: True,
    ):
        """`report(running, waiting)` is told the sequence counts when they change (the served model's metrics;
        each report crosses to Triton's process, so not every step). `serving()` says whether the server still
        serves (false: the shutdown has begun)."""
        self.runner = runner
        self._report = report
        self._reported = (0, 0)
        self._report_lock = threading.Lock()  # submit (Triton's thread) and the loop both report
        self.serving = serving
        self._serving_checked = time.monotonic()
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        runner.reset(max_batch)
        self._waiting: deque[Generation] = deque()
        self._decoding: list[Generation] = []  # slot i holds self._decoding[i]
        self._prefilling: Generation | None = None  # in slot len(self._decoding)
        self._prefilled = 0  # prompt tokens of self._prefilling already run
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="in-flight-batcher", daemon=True)
        self._thread.start()

    def submit(self, generation: Generation) -> None:
        with self._wake:
            self._waiting.append(generation)
            self._wake.notify()
            waiting = len(self._waiting)
        self.report(self.active, waiting)

    def report(self, running: int, waiting: int) -> None:
        with self._report_lock:
            if (running, waiting) != self._reported:
                self._reported = (running, waiting)
                self._report(running, waiting)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        self._end_all()

    def _end_all(self) -> None:
        """Every request not finished yet ends with an error (the server is going away)."""
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for generation in [*waiting, *filter(None, [self._prefilling]), *self._decoding]:
            generation.fail(
                f"the server is shutting down: generation cut after {len(generation.tokens)} of "
                f"{generation.request.max_tokens} tokens",
                unavailable=True,
            )
        self._prefilling, self._decoding = None, []

    def _still_serving(self) -> bool:
        now = time.monotonic()
        if now - self._serving_checked < SERVING_CHECK_S:
            return True
        self._serving_checked = now
        try:
            return self.serving()
        except Exception:  # a failed question is no answer: keep serving
            log.exception("could not ask whether the server is still serving")
            return True

    @property
    def active(self) -> int:
        """Sequences holding a slot (decoding or being prefilled)."""
        return len(self._decoding) + (self._prefilling is not None)

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closed or self._waiting or self.active)
                if self._closed:
                    return
            try:
                if not self._still_serving():
                    self._end_all()
                    continue
                self._drop_cancelled()
                self._prefill()
                if self._decoding:
                    self._decode()
            except Exception as exc:  # a failed step fails its sequences, never the server
                log.exception("in-flight batch step failed")
                for generation in [*self._decoding, *filter(None, [self._prefilling])]:
                    generation.fail(f"inference failed: {exc}")
                self._decoding, self._prefilling = [], None
            self.report(self.active, len(self._waiting))

    def _drop_cancelled(self) -> None:
        with self._wake:
            # One look per request: a client cancelling between two looks would leave the queue unanswered.
            kept, cancelled = deque(), []
            for generation in self._waiting:
                (cancelled if generation.sink.cancelled() else kept).append(generation)
            self._waiting = kept
        if self._prefilling is not None and self._prefilling.sink.cancelled():
            cancelled.append(self._prefilling)
            self._prefilling = None
        for slot in reversed(range(len(self._decoding))):
            if self._decoding[slot].sink.cancelled():
                cancelled.append(self._decoding[slot])
                self._release(slot)
        for generation in cancelled:  # ends the request (its client has gone)
            generation.fail("the client cancelled the request")

    def _prefill(self) -> None:
        """Prefill up to `prefill_chunk` prompt tokens this turn: whole short prompts one after another
        (each joins the decoding batch at once), a long one in chunks over several turns."""
        budget = self.prefill_chunk
        while budget > 0:
            with self._wake:
                if self._prefilling is None:
                    if not self._waiting or len(self._decoding) >= self.max_batch:
                        return
                    self._prefilling, self._prefilled = self._waiting.popleft(), 0
            budget -= self._prefill_chunk(budget)

    def _prefill_chunk(self, budget: int) -> int:
        generation = self._prefilling
        ids = generation.request.prompt_ids
        chunk = ids[self._prefilled : self._prefilled + budget]
        logits = self.runner.prefill_slot(len(self._decoding), torch.tensor([chunk]), torch.tensor([self._prefilled]))
        self._prefilled += len(chunk)
        if self._prefilled == len(ids):
            self._prefilling = None
            if not generation.push(generation.choose(logits[0, -1].numpy())):
                self._decoding.append(generation)  # its slot is len(self._decoding) already
        return len(chunk)

    def _decode(self) -> None:
        tokens = torch.tensor([[g.tokens[-1]] for g in self._decoding])
        positions = torch.tensor([g.position - 1 for g in self._decoding])
        logits = self.runner.step_slots(tokens, positions)
        for slot in reversed(range(len(self._decoding))):
            generation = self._decoding[slot]
            if generation.push(generation.choose(logits[slot, -1].numpy())):
                self._release(slot)

    def _release(self, slot: int) -> None:
        last = len(self._decoding) - 1
        if slot != last:
            self.runner.move_slot(last, slot)
            self._decoding[slot] = self._decoding[last]
        self._decoding.pop()
        if self._prefilling is not None:  # it sat right after the decoding block: keep it there
            self.runner.move_slot(last + 1, last)
