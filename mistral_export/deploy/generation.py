"""One generate request of the text interface, from its input tensors to the text it streams back.

The interface is tensorrtllm_backend's (what genai-perf and TensorRT-LLM clients send): `text_input`,
`max_tokens`, and optional `stream`, `exclude_input_in_output`, `min_length`, `temperature`, `top_k`,
`top_p`, `seed`, `stop_words`, `bad_words`; output `text_output`. Both served layouts (the in-process
ONNX Runtime model and the TensorRT BLS model) share this module: parsing and limits, sampling,
stop conditions and incremental detokenization.

Sampling: greedy unless `temperature` > 0 (then softmax(logits / temperature) restricted to the `top_k`
most likely tokens (0: all) and the smallest set reaching probability `top_p` (0 or 1: all), drawn with
`seed`). `min_length` keeps EOS from being chosen before that many tokens. `stop_words` end the
generation once the generated text ends with one (the stop word is part of the output, as in
TensorRT-LLM); `bad_words` are token sequences never completed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from mistral_export.artifacts.description import ArtifactDescription
from mistral_export.model.tokenizer import TextTokenizer

# name -> (Triton datatype, required); the order is the config's.
INPUTS = {
    "text_input": ("TYPE_STRING", True),
    "max_tokens": ("TYPE_INT32", True),
    "stream": ("TYPE_BOOL", False),
    "exclude_input_in_output": ("TYPE_BOOL", False),
    "min_length": ("TYPE_INT32", False),
    "temperature": ("TYPE_FP32", False),
    "top_k": ("TYPE_INT32", False),
    "top_p": ("TYPE_FP32", False),
    "seed": ("TYPE_UINT64", False),
    "stop_words": ("TYPE_STRING", False),
    "bad_words": ("TYPE_STRING", False),
}
LIST_INPUTS = ("stop_words", "bad_words")  # variable-length lists of strings; the others hold one value
OUTPUT = "text_output"
# Sent with the final response only: why the generation ended ("stop": EOS or a stop word, "length":
# max_tokens) and its token counts, so that a client (the OpenAI frontend's usage) needs no tokenizer.
FINISH_OUTPUTS = {"finish_reason": "TYPE_STRING", "prompt_tokens": "TYPE_INT32", "completion_tokens": "TYPE_INT32"}
# Request parameters Triton itself attaches (gRPC streaming's empty final response); any other is refused.
TRITON_PARAMETER_PREFIX = "triton_"
# Tokens of prompt context decoded with the new tokens, so that spaces a tokenizer attaches to a
# token's start come out right (SentencePiece-style tokenizers drop a leading one otherwise).
DETOKENIZE_CONTEXT = 5


class RequestError(ValueError):
    """A request the model refuses; the message goes back to the client as the error."""


@dataclass(frozen=True)
class Limits:
    """What a request may ask of this model (read from artifact.json when the model loads)."""

    max_total_tokens: int  # prompt + max_tokens
    cache_wraps: bool  # False: the cache is linear and max_total_tokens is its capacity

    @classmethod
    def of(cls, description: ArtifactDescription) -> Limits:
        if description.cache.wraps:  # a rolling cache: the model's own context length is the limit
            return cls(description.config.max_context, True)
        return cls(description.cache.capacity, False)

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        why = "" if self.cache_wraps else " (a model without sliding window: its cache capacity)"
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {max_tokens}")
        if prompt_tokens >= self.max_total_tokens:
            raise RequestError(
                f"text_input is {prompt_tokens} tokens, longer than this model allows "
                f"({self.max_total_tokens - 1} tokens{why})"
            )
        if max_tokens > self.max_total_tokens - 1:
            raise RequestError(
                f"max_tokens {max_tokens} is over the limit {self.max_total_tokens - 1} of this model{why}"
            )
        if prompt_tokens + max_tokens > self.max_total_tokens:
            raise RequestError(
                f"text_input ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
                f"{prompt_tokens + max_tokens} tokens exceeds the limit {self.max_total_tokens} "
                f"of this model{why}; shorten the prompt or lower max_tokens"
            )


@dataclass
class GenerateRequest:
    prompt: str
    prompt_ids: list[int]
    max_tokens: int
    stream: bool = False
    exclude_input: bool = False
    min_length: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_words: list[str] = field(default_factory=list)
    bad_words_ids: list[list[int]] = field(default_factory=list)


def _scalar(inputs: Mapping[str, np.ndarray], name: str, default=None):
    value = inputs.get(name)
    if value is None:
        return default
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise RequestError(f"{name} must hold one value, got shape {list(np.shape(value))}")
    return flat[0]


def _text(value) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise RequestError("text inputs must be UTF-8") from None


def parse_request(
    inputs: Mapping[str, np.ndarray], parameters: Mapping[str, object], tokenizer: TextTokenizer, limits: Limits
) -> GenerateRequest:
    """The request's input tensors (numpy, as Triton hands them over) checked and tokenized."""
    unknown = sorted(k for k in parameters if not k.startswith(TRITON_PARAMETER_PREFIX))
    if unknown:
        raise RequestError(
            f"unknown parameter(s) {', '.join(unknown)}; this model takes the inputs {', '.join(INPUTS)}"
        )
    prompt = _text(_scalar(inputs, "text_input", b""))
    if not prompt:
        raise RequestError("text_input is empty: give a prompt to continue")
    request = GenerateRequest(
        prompt=prompt,
        prompt_ids=tokenizer.encode(prompt),
        max_tokens=int(_scalar(inputs, "max_tokens")),
        stream=bool(_scalar(inputs, "stream", False)),
        exclude_input=bool(_scalar(inputs, "exclude_input_in_output", False)),
        min_length=int(_scalar(inputs, "min_length", 0)),
        temperature=float(_scalar(inputs, "temperature", 0.0)),
        top_k=int(_scalar(inputs, "top_k", 0)),
        top_p=float(_scalar(inputs, "top_p", 1.0)),
    )
    seed = _scalar(inputs, "seed")
    request.seed = None if seed is None else int(seed)
    limits.check(len(request.prompt_ids), request.max_tokens)
    if not 0 <= request.min_length <= request.max_tokens:
        raise RequestError(
            f"min_length must be between 0 and max_tokens ({request.max_tokens}), got {request.min_length}"
        )
    if request.temperature < 0 or request.top_k < 0 or not 0 <= request.top_p <= 1:
        raise RequestError(
            f"sampling needs temperature >= 0, top_k >= 0 and 0 <= top_p <= 1, got "
            f"{request.temperature}, {request.top_k}, {request.top_p}"
        )
    words = {
        name: [_text(w) for w in np.asarray(inputs[name]).reshape(-1)] if name in inputs else [] for name in LIST_INPUTS
    }
    request.stop_words = [w for w in words["stop_words"] if w]
    request.bad_words_ids = [ids for ids in (tokenizer.encode(w, add_bos=False) for w in words["bad_words"]) if ids]
    return request


class IncrementalDetokenizer:
    """Text of a growing token sequence, released only in whole characters.

    Decodes a short window (some prompt context plus the tokens not yet released) and releases what
    the window adds beyond its context, unless that ends in U+FFFD: the rest of a multi-byte
    character is still to come. Each call decodes a few tokens, not the whole generation.
    """

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: list[int]):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-DETOKENIZE_CONTEXT:])
        self._prefix = 0  # window start
        self._read = len(self._ids)  # tokens whose text is released

    def push(self, token: int) -> str:
        self._ids.append(token)
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is held back at the end (an incomplete character decodes as U+FFFD, as in decode())."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        context = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        if len(text) <= len(context) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(context) :]


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop" (EOS or a stop word) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


class Sink:
    """Where a generation's output goes (a Triton response sender, or a test's collector)."""

    def send(self, text: str, final: Finish | None) -> None:
        """One response; `final` (how it ended) with the last one, None before."""
        raise NotImplementedError

    def fail(self, message: str, unavailable: bool = False) -> None:
        """End the request with an error. `unavailable`: the server, not the request, is why (it is shutting
        down): the client may retry elsewhere."""
        raise NotImplementedError

    def cancelled(self) -> bool:
        return False


class TokenObserver:
    """Told of every generated token (the served model's LLM metrics); this one ignores them."""

    def token(self, first: bool, seconds: float) -> None:
        """`seconds`: since the request arrived for the first token, since the previous token otherwise."""


IGNORED = TokenObserver()  # a generation nobody measures


class Generation:
    """One request's tokens, sampling and output, whatever runs the model."""

    def __init__(
        self, request: GenerateRequest, tokenizer: TextTokenizer, sink: Sink, observer: TokenObserver = IGNORED
    ):
        self.request = request
        self.sink = sink
        self.observer = observer
        self._last_token_at = time.monotonic()  # the request's arrival until the first token
        self.eos_id = tokenizer.eos_id
        self.tokens: list[int] = []
        self.done = False
        self._detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        self._text: list[str] = []
        self._rng = np.random.default_rng(request.seed)

    @property
    def position(self) -> int:
        """Tokens in the cache once the last chosen token has been run."""
        return len(self.request.prompt_ids) + len(self.tokens)

    def choose(self, logits: np.ndarray) -> int:
        """The next token from the last position's logits [V] (fp32)."""
        r = self.request
        logits = np.array(logits, dtype=np.float32)
        context = r.prompt_ids + self.tokens if r.bad_words_ids else []  # not copied per token when unused
        for ids in r.bad_words_ids:
            if len(ids) == 1 or context[len(context) - len(ids) + 1 :] == ids[:-1]:
                logits[ids[-1]] = -np.inf
        if len(self.tokens) < r.min_length and self.eos_id is not None:
            logits[self.eos_id] = -np.inf
        if r.temperature == 0 or r.top_k == 1:
            return int(np.argmax(logits))
        logits = logits / r.temperature
        order = np.argsort(-logits, kind="stable")
        if r.top_k:
            order = order[: r.top_k]
        probs = np.exp(logits[order] - logits[order[0]])
        probs /= probs.sum()
        if 0 < r.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(probs), r.top_p)) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self._rng.choice(len(order), p=probs)])

    def push(self, token: int) -> bool:
        """Take the chosen token, send what text it completes; True when the generation has ended."""
        self.tokens.append(token)
        now = time.monotonic()
        self.observer.token(len(self.tokens) == 1, now - self._last_token_at)
        self._last_token_at = now
        r = self.request
        delta = self._detokenizer.push(token)
        stopped = False
        if delta and r.stop_words:  # the text is joined only to look for a stop word
            text_so_far = "".join(self._text) + delta
            stopped = any(w in text_so_far[-(len(w) + len(delta)) :] for w in r.stop_words)
        self.done = stopped or token == self.eos_id or len(self.tokens) >= r.max_tokens
        finish = None
        if self.done:
            delta += self._detokenizer.flush()
            reason = "stop" if stopped or token == self.eos_id else "length"
            finish = Finish(reason, len(r.prompt_ids), len(self.tokens))
        self._text.append(delta)
        if r.stream and (delta or self.done):
            self.sink.send(delta, finish)
        elif self.done:
            text = "".join(self._text)
            self.sink.send(text if r.exclude_input else r.prompt + text, finish)
        return self.done

    def fail(self, message: str, unavailable: bool = False) -> None:
        self.done = True
        self.sink.fail(message, unavailable)
