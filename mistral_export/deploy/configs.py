"""The config.pbtxt of each model the repository holds, checked against Triton's own proto before writing.

`tritonclient.grpc.model_config_pb2` is the schema the server parses: a config it rejects (unknown
field, bad enum, bad number) is never written. It checks syntax, not meaning; tests check the meaning.
"""

from __future__ import annotations

from mistral_export.deploy.generation import FINISH_OUTPUTS, INPUTS, LIST_INPUTS, OUTPUT
from mistral_export.errors import MistralExportError


def parse_config(text: str, where: str):
    """The ModelConfig message of `text`; a MistralExportError naming `where` if Triton's proto rejects it."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise MistralExportError("packaging needs tritonclient: pip install 'mistral-export[deploy]'") from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise MistralExportError(f"{where}: Triton's model config schema rejects it: {exc}") from None


def _dims(dims) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _parameters(parameters: dict[str, object]) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in parameters.items())


def text_interface_config(name: str, max_batch: int, instances: int, kind: str, parameters: dict[str, object]) -> str:
    """A decoupled Python-backend model with tensorrtllm_backend's text interface."""
    inputs = ",\n".join(
        f'  {{ name: "{n}" data_type: {t} dims: {_dims([-1] if n in LIST_INPUTS else [1])}'
        f"{'' if required else ' optional: true'} }}"
        for n, (t, required) in INPUTS.items()
    )
    finish = "".join(f',\n  {{ name: "{n}" data_type: {t} dims: [ 1 ] }}' for n, t in FINISH_OUTPUTS.items())
    return f'''# Text generation with tensorrtllm_backend's text interface; decoupled: tokens stream as responses.
name: "{name}"
backend: "python"
max_batch_size: {max_batch}
model_transaction_policy {{ decoupled: true }}
input [
{inputs}
]
output [
  {{ name: "{OUTPUT}" data_type: TYPE_STRING dims: [ -1 ] }}{finish}
]
instance_group [ {{ count: {instances} kind: {kind} }} ]
{_parameters(parameters)}
'''
