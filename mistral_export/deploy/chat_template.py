"""Chat messages to the prompt text the model was trained on.

A checkpoint's `chat_template` (tokenizer_config.json) is rendered the way transformers'
`apply_chat_template` does: jinja2's immutable sandbox with `trim_blocks` and `lstrip_blocks`, the
variables `messages`, `bos_token`, `eos_token`, `add_generation_prompt` and the function
`raise_exception`. A checkpoint without one (native checkpoints, the `tiny` fixture) gets Mistral's
instruct format, `<s>[INST] user [/INST]assistant</s>[INST] ...`, with a system message put before the
first user message, as the Mistral 7B Instruct checkpoints' own template writes it. (mistral-common
builds that format from token ids, not text, and pulls in its own tokenizers: not used here.)
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mistral_export.errors import MistralExportError
from mistral_export.model.tokenizer import BOS, EOS

TOKENIZER_CONFIG = "tokenizer_config.json"

MISTRAL_INSTRUCT = """{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] + '\\n\\n' %}{%- set messages = messages[1:] %}
{%- else %}{%- set system = '' %}{%- endif %}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only system (first), user and assistant roles are supported') }}
    {%- endif %}
{%- endfor %}"""


class ChatTemplateError(ValueError):
    """Messages the template refuses (its raise_exception, or a rendering error): a bad request."""


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _token_text(value, default: str) -> str:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


class ChatTemplate:
    def __init__(
        self, source: str, bos_token: str = BOS, eos_token: str = EOS, origin: str = "Mistral's instruct format"
    ):
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise_exception
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateError as exc:
            raise MistralExportError(f"{origin}: the chat template does not parse ({exc})") from None
        self.bos_token, self.eos_token, self.origin = bos_token, eos_token, origin

    def render(self, messages: list[dict]) -> str:
        """The prompt for MESSAGES, ready for the assistant's answer. Without its leading BOS: the served model's
        tokenizer adds BOS to every prompt (a second one would change the text the model sees)."""
        try:
            text = self._template.render(
                messages=messages, bos_token=self.bos_token, eos_token=self.eos_token, add_generation_prompt=True
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed on these messages: {exc}") from None
        return text[len(self.bos_token) :] if self.bos_token and text.startswith(self.bos_token) else text


def load_chat_template(folder: Path) -> ChatTemplate:
    """FOLDER's tokenizer_config.json chat template (with its BOS/EOS text), else Mistral's instruct format."""
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.is_file():
        return ChatTemplate(MISTRAL_INSTRUCT)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MistralExportError(f"{path}: not readable JSON ({exc})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: transformers uses "default" for chat
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        return ChatTemplate(
            MISTRAL_INSTRUCT, _token_text(config.get("bos_token"), BOS), _token_text(config.get("eos_token"), EOS)
        )
    return ChatTemplate(
        template, _token_text(config.get("bos_token"), BOS), _token_text(config.get("eos_token"), EOS), origin=str(path)
    )
