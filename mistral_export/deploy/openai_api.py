"""An OpenAI-compatible HTTP frontend (FastAPI + uvicorn) in front of the Triton server; Triton stays the engine.

`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, streamed (server-sent events ending in
`data: [DONE]`) or not. Each request becomes one gRPC streaming request to the generate model (its text
interface, deploy/generation.py): `max_tokens`, `temperature`, `top_p`, `seed` and `stop` map onto its inputs;
its final response carries `finish_reason` and the token counts that `usage` reports, so the frontend counts
nothing itself. Chat messages go through the model's chat template (deploy/chat_template.py).

OpenAI's `stop` ends the text before the stop string (the text interface's stop words end it after), so the
frontend cuts the text at the first stop string and, while streaming, holds back the last characters that
could still begin one. Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for
a bad request (including what the model itself refuses), 404 for an unknown model.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from mistral_export.artifacts.description import DESCRIPTION_FILE, ArtifactDescription
from mistral_export.deploy.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from mistral_export.deploy.configs import parse_config
from mistral_export.deploy.generation import OUTPUT, Finish, Limits
from mistral_export.errors import MistralExportError
from mistral_export.model.tokenizer import TextTokenizer, load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's documented default for /v1/completions
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0  # streams still open then are cut (Triton, stopped after, cancels their requests)


# --- the models a repository serves -------------------------------------------------------------------------


@dataclass
class ServedModel:
    name: str
    limits: Limits
    tokenizer: TextTokenizer  # only to size a chat's default max_tokens (the model counts usage itself)
    chat_template: ChatTemplate
    created: int


def _description_folder(version: Path) -> Path:
    """A folder with an artifact.json in a generate model's version folder (every packaged artifact of one model
    describes the same model and cache, whichever GPU it was built for)."""
    found = sorted(version.glob(f"**/{DESCRIPTION_FILE}"), key=lambda p: len(p.parts))
    if not found:
        raise MistralExportError(
            f"{version}: no {DESCRIPTION_FILE} (a model repository from `mistral-export package`?)"
        )
    return found[0].parent


def served_models(repository: Path) -> dict[str, ServedModel]:
    """The repository's text-generation models (a text_output output), by name."""
    models = {}
    for config_path in sorted(Path(repository).glob("*/config.pbtxt")):
        config = parse_config(config_path.read_text(), str(config_path))
        if not any(o.name == OUTPUT for o in config.output):
            continue
        version = config_path.parent / "1"
        models[config.name] = ServedModel(
            name=config.name,
            limits=Limits.of(ArtifactDescription.read(_description_folder(version))),
            tokenizer=load_tokenizer(version),
            chat_template=load_chat_template(version),
            created=int(config_path.stat().st_mtime),
        )
    if not models:
        raise MistralExportError(f"{repository}: no text-generation model (a config.pbtxt with output {OUTPUT})")
    return models


# --- requests --------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields with no effect here (user, presence_penalty, ...) are accepted

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    min_tokens: int | None = None  # vLLM's extension (load generators ask for exact lengths): no EOS before this


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    echo: bool | None = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[dict] | None = None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = {400: "invalid_request_error", 404: "invalid_request_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _check_common(request: SamplingRequest) -> None:
    if request.n not in (None, 1):
        raise BadRequest(f"n must be 1 (one choice per request), got {request.n}", param="n")
    if request.logprobs:
        raise BadRequest("logprobs are not supported by this server", param="logprobs")
    if request.seed is not None and not 0 <= request.seed < 2**64:
        raise BadRequest(f"seed must be between 0 and 2**64 - 1, got {request.seed}", param="seed")


def _stops(request: SamplingRequest) -> list[str]:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return [s for s in stops if s]


def _message_text(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise BadRequest(f"message content parts must be text, got type {part.get('type')!r}", param="messages")
        parts.append(part["text"])
    return "".join(parts)


# --- forwarding to Triton ---------------------------------------------------------------------------------------


class ModelRefused(Exception):
    """The generate model's (or Triton's) error for a request."""


def _input(name: str, value, datatype: str):
    from tritonclient.grpc import InferInput

    dtypes = {"BYTES": object, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_, "UINT64": np.uint64}
    array = np.array(value, dtype=dtypes[datatype])
    tensor = InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


class TritonGenerate:
    """One gRPC channel (tritonclient's asyncio client) to the server; a streaming call per request."""

    def __init__(self, url: str):
        from tritonclient.grpc.aio import InferenceServerClient

        self.client = InferenceServerClient(url)

    async def close(self) -> None:
        await self.client.close()

    async def generate(
        self,
        model: str,
        prompt: str,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stops: list[str],
        min_tokens: int = 0,
    ) -> AsyncIterator[tuple[str, Finish | None]]:
        """(text, None) per streamed piece, then (text, Finish) for the last."""
        inputs = [
            _input("text_input", [[prompt.encode("utf-8")]], "BYTES"),
            _input("max_tokens", [[max_tokens]], "INT32"),
            _input("stream", [[True]], "BOOL"),
            _input("temperature", [[temperature]], "FP32"),
            _input("top_p", [[top_p]], "FP32"),
        ]
        if seed is not None:
            inputs.append(_input("seed", [[seed]], "UINT64"))
        if min_tokens:
            inputs.append(_input("min_length", [[min_tokens]], "INT32"))
        if stops:
            inputs.append(_input("stop_words", [[s.encode("utf-8") for s in stops]], "BYTES"))

        async def one_request():
            yield {"model_name": model, "inputs": inputs, "enable_empty_final_response": True}

        responses = self.client.stream_infer(one_request())
        finished = False
        try:
            async for result, error in responses:
                if error is not None:  # the request's last response
                    finished = True
                    raise ModelRefused(error.message() if hasattr(error, "message") else str(error))
                text = result.as_numpy(OUTPUT)
                piece = text.reshape(-1)[0].decode("utf-8") if text is not None else ""
                reason = result.as_numpy("finish_reason")
                if reason is not None:
                    prompt_tokens, completion_tokens = (
                        int(result.as_numpy(n).reshape(-1)[0]) for n in ("prompt_tokens", "completion_tokens")
                    )
                    finished = True
                    yield piece, Finish(reason.reshape(-1)[0].decode(), prompt_tokens, completion_tokens)
                    return
                yield piece, None
                if result.get_response().parameters["triton_final_response"].bool_param:
                    raise ModelRefused("the model ended the response without a finish reason")
        finally:
            # A client gone mid-stream cancels the request in Triton (the model frees its slot). Not after the last
            # response: cancelling a finished call could leave the Python-backend model unable to unload
            # (tritonserver then waited out its 30 s exit timeout on SIGTERM).
            if not finished:
                responses.cancel()


class StopCutter:
    """Text released up to (not including) the first stop string; the tail that could begin one is held back."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.keep = max((len(s) - 1 for s in stops), default=0)
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            released, self.held, self.stopped = self.held[: min(hits)], "", True
            return released
        cut = max(0, len(self.held) - self.keep)
        released, self.held = self.held[:cut], self.held[cut:]
        return released

    def flush(self) -> str:
        released, self.held = self.held, ""
        return released


# --- the app ----------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One validated request, ready to forward."""

    model: ServedModel
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    stream: bool
    include_usage: bool
    min_tokens: int = 0
    echo: str = ""  # the prompt, when a completion request asks for it back


def create_app(repository: Path, triton_grpc: str):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    models = served_models(repository)
    state: dict[str, TritonGenerate] = {}

    @asynccontextmanager
    async def lifespan(app):
        state["triton"] = TritonGenerate(triton_grpc)  # made on uvicorn's loop: a gRPC aio channel belongs to one
        yield
        await state["triton"].close()

    app = FastAPI(title="mistral-export OpenAI-compatible API", lifespan=lifespan)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return JSONResponse(error_body(str(exc), exc.status, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = str(first.get("msg", "invalid request"))
        message = f"{where}: {message}" if where else message
        return JSONResponse(error_body(message, 400, where or None), status_code=400)

    def model_of(name: str) -> ServedModel:
        if name not in models:
            raise BadRequest(
                f"the model '{name}' does not exist; this server has {', '.join(models)}",
                404,
                "model",
                "model_not_found",
            )
        return models[name]

    @app.get("/v1/models")
    async def list_models():
        return {
            "object": "list",
            "data": [
                {"id": m.name, "object": "model", "created": m.created, "owned_by": "mistral-export"}
                for m in models.values()
            ],
        }

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        _check_common(request)
        model = model_of(request.model)
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if len(prompts) != 1:
            raise BadRequest(f"prompt must be one string (one choice per request), got {len(prompts)}", param="prompt")
        job = _job(
            model, request, prompts[0], DEFAULT_COMPLETION_TOKENS if request.max_tokens is None else request.max_tokens
        )
        job.echo = prompts[0] if request.echo else ""
        return await respond(job, "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest):
        _check_common(request)
        model = model_of(request.model)
        if not request.messages:
            raise BadRequest("messages is empty", param="messages")
        messages = [{"role": m.role, "content": _message_text(m)} for m in request.messages]
        try:
            prompt = model.chat_template.render(messages)
        except ChatTemplateError as exc:
            raise BadRequest(str(exc), param="messages") from None
        max_tokens = request.max_tokens if request.max_completion_tokens is None else request.max_completion_tokens
        if max_tokens is None:  # as OpenAI: up to the model's context
            max_tokens = max(1, model.limits.max_total_tokens - len(model.tokenizer.encode(prompt)))
        return await respond(_job(model, request, prompt, max_tokens), "chat.completion", "chatcmpl")

    def _job(model: ServedModel, request: SamplingRequest, prompt: str, max_tokens: int) -> Job:
        if request.min_tokens is not None and not 0 <= request.min_tokens <= max_tokens:
            raise BadRequest(
                f"min_tokens must be between 0 and max_tokens ({max_tokens}), got {request.min_tokens}",
                param="min_tokens",
            )
        return Job(
            model,
            prompt,
            max_tokens,
            1.0 if request.temperature is None else request.temperature,
            1.0 if request.top_p is None else request.top_p,
            request.seed,
            _stops(request),
            bool(request.stream),
            bool(request.stream_options and request.stream_options.include_usage),
            request.min_tokens or 0,
        )

    async def respond(job: Job, kind: str, id_prefix: str):
        pieces = state["triton"].generate(
            job.model.name, job.prompt, job.max_tokens, job.temperature, job.top_p, job.seed, job.stops, job.min_tokens
        )
        try:  # the model checks the request before its first response: a refusal is still an HTTP error
            first = await anext(pieces)
        except ModelRefused as exc:
            await pieces.aclose()
            raise BadRequest(str(exc)) from None
        identity = {"id": f"{id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": job.model.name}
        chat = kind == "chat.completion"
        if job.stream:
            return StreamingResponse(_events(job, identity, chat, first, pieces), media_type="text/event-stream")
        cutter, text, finish = StopCutter(job.stops), [job.echo], None
        try:
            piece, finish = first
            text.append(cutter.push(piece))
            async for piece, last in pieces:
                text.append(cutter.push(piece))
                finish = last
        except ModelRefused as exc:
            raise BadRequest(str(exc)) from None
        text.append("" if cutter.stopped else cutter.flush())
        reason = "stop" if cutter.stopped else finish.reason
        choice = (
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(text)},
                "finish_reason": reason,
                "logprobs": None,
            }
            if chat
            else {"index": 0, "text": "".join(text), "finish_reason": reason, "logprobs": None}
        )
        return {**identity, "object": kind, "choices": [choice], "usage": _usage(finish)}

    async def _events(job: Job, identity: dict, chat: bool, first, pieces) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(text: str | None, reason: str | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
            return f"data: {json.dumps({**identity, 'object': kind, 'choices': [choice]})}\n\n"

        # The per-token event is the same document but for its text: serialized once, the text spliced in.
        before, after = event("\0").split(json.dumps("\0"))

        def text_event(text: str) -> str:
            return before + json.dumps(text) + after

        cutter = StopCutter(job.stops)
        try:
            if chat:
                yield event(None, role=True)
            if job.echo:
                yield text_event(job.echo)
            piece, finish = first
            while True:
                released = cutter.push(piece)
                if released:
                    yield text_event(released)
                if finish is not None or cutter.stopped:
                    break
                piece, finish = await anext(pieces)
            if cutter.stopped and finish is None:  # the model ends at the stop word's token: take its counts
                async for _, last in pieces:
                    finish = last
            tail = cutter.flush() if not cutter.stopped else ""
            if tail:
                yield text_event(tail)
            yield event(None if chat else "", "stop" if cutter.stopped else finish.reason)
            if job.include_usage:
                yield f"data: {json.dumps({**identity, 'object': kind, 'choices': [], 'usage': _usage(finish)})}\n\n"
        except ModelRefused as exc:  # after the first token (e.g. the engine failed): in-stream, as OpenAI does
            yield f"data: {json.dumps(error_body(str(exc), 500))}\n\n"
        finally:
            await pieces.aclose()
        yield "data: [DONE]\n\n"

    return app


def _usage(finish: Finish | None) -> dict | None:
    if finish is None:
        return None
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }


# --- running it beside the server ------------------------------------------------------------------------------


@contextmanager
def running_frontend(repository: Path, triton_grpc: str, host: str, port: int):
    """The frontend served by uvicorn in a thread of this process for the duration of the block; stopped after
    (in-flight responses finish first). A thread, not a process: it stops with `serve`, whatever stops it."""
    import uvicorn

    app = create_app(repository, triton_grpc)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=STOP_TIMEOUT_S
        )
    )
    failure: list[BaseException] = []

    def run():
        try:
            server.run()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 (uvicorn exits with SystemExit when it cannot bind)
            failure.append(exc)

    thread = threading.Thread(target=run, name="openai-frontend", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(5)
            raise MistralExportError(
                f"the OpenAI frontend could not start on {host}:{port} "
                f"(port in use? {failure[0] if failure else 'no answer'})"
            )
        time.sleep(0.05)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(STOP_TIMEOUT_S + 5)
