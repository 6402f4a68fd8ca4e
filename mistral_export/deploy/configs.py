"""The config.pbtxt of each model the repository holds, checked against Triton's own proto before writing.

`tritonclient.grpc.model_config_pb2` is the schema the server parses: a config it rejects (unknown
field, bad enum, bad number) is never written. It checks syntax, not meaning; tests check the meaning
(state names and dims against the engine's I/O).
"""

from __future__ import annotations

from mistral_export.deploy.generation import FINISH_OUTPUTS, INPUTS, LIST_INPUTS, OUTPUT
from mistral_export.errors import MistralExportError

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32"}
STATE_NAME = "zero"  # the initial state every sequence starts from (an empty cache)


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
        f'{"" if required else " optional: true"} }}' for n, (t, required) in INPUTS.items())
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


def _io(engine: dict, folder: str) -> tuple[dict, dict]:
    try:
        io = engine["io"]
        return ({t["name"]: t for t in io["inputs"]}, {t["name"]: t for t in io["outputs"]})
    except (KeyError, TypeError):
        raise MistralExportError(f"{folder}/engine.json: no io {{inputs, outputs}} list of {{name, dtype, shape}} "
                                 f"(the TensorRT build writes it)") from None


def cache_states(engine: dict, folder: str) -> list[dict]:
    """One implicit state per layer and key/value: engine input past_key_values.{i}.key|value fed by
    output present.{i}.key|value, dims [Hkv, C, D] (the engine's, batch dimension left out)."""
    inputs, outputs = _io(engine, folder)
    config = engine["model"]["config"]
    states = []
    for i in range(config["num_hidden_layers"]):
        for part in ("key", "value"):
            past, present = f"past_key_values.{i}.{part}", f"present.{i}.{part}"
            if past not in inputs or present not in outputs:
                raise MistralExportError(f"{folder}/engine.json: the engine has no {past} input / {present} output")
            dims = [config["num_key_value_heads"], engine["cache"]["capacity"], config["head_dim"]]
            for tensor in (inputs[past], outputs[present]):
                if list(tensor["shape"][1:]) != dims or tensor["dtype"] != engine["cache"]["dtype"]:
                    raise MistralExportError(
                        f"{folder}/engine.json: {tensor['name']} is {tensor['dtype']} {tensor['shape']}, expected "
                        f"{engine['cache']['dtype']} [batch, {', '.join(map(str, dims))}] (cache of engine.json)")
            states.append({"input": past, "output": present, "dims": dims,
                           "dtype": TRITON_DTYPES[engine["cache"]["dtype"]]})
    return states


def engine_config(name: str, engine: dict, folder: str, max_batch: int, instances: int,
                  plan_files: dict[str, str]) -> str:
    """The tensorrt_plan core model: sequence batching (oldest), the rolling cache as implicit state.

    Each sequence's cache lives in Triton between its requests (zeroed when one starts), bound to the
    engine's cache input and output as one buffer (the engine updates it in place). Without control
    inputs: the engine has none; Triton tracks sequence start and end from the request flags and the
    correlation ID. The position (past_len) is an ordinary input: the engine has no output carrying it.
    """
    inputs, outputs = _io(engine, folder)
    for needed, where in (("input_ids", inputs), ("past_len", inputs), ("logits", outputs)):
        if needed not in where:
            raise MistralExportError(f"{folder}/engine.json: the engine has no {needed} tensor")
    vocab = engine["model"]["config"]["vocab_size"]
    logits_dims = [-1, vocab] if outputs["logits"]["shape"][1] != 1 else [1, vocab]
    states = ",\n".join(
        f'''    {{
      input_name: "{s["input"]}"
      output_name: "{s["output"]}"
      data_type: {s["dtype"]}
      dims: {_dims(s["dims"])}
      initial_state {{ data_type: {s["dtype"]} dims: {_dims(s["dims"])} zero_data: true name: "{STATE_NAME}" }}
      use_same_buffer_for_input_output: true
    }}''' for s in cache_states(engine, folder))
    if len(plan_files) == 1:
        files = f'default_model_filename: "{next(iter(plan_files.values()))}"'
    else:
        files = "\n".join(f'cc_model_filenames {{ key: "{cc}" value: "{f}" }}' for cc, f in sorted(plan_files.items()))
    return f'''# The TensorRT engine; one step of a batch of sequences, each sequence's rolling cache held by Triton.
name: "{name}"
platform: "tensorrt_plan"
max_batch_size: {max_batch}
{files}
input [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "past_len" data_type: TYPE_INT64 dims: [ 1 ] reshape {{ shape: [ ] }} }}
]
output [
  {{ name: "logits" data_type: {TRITON_DTYPES[outputs["logits"]["dtype"]]} dims: {_dims(logits_dims)} }}
]
sequence_batching {{
  max_sequence_idle_microseconds: 60000000
  oldest {{ max_candidate_sequences: {max_batch} preferred_batch_size: [ {max_batch} ] max_queue_delay_microseconds: 200 }}
  state [
{states}
  ]
}}
instance_group [ {{ count: {instances} kind: KIND_GPU }} ]
'''
