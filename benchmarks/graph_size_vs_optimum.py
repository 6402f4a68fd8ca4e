"""Nodes per layer: mistral-export's ONNX against Optimum's export of the same Mistral config.

Optimum cannot live in the project's environment (it pins an older transformers), so its exports are made
in a side virtualenv first and passed in:

    python3 -m venv /tmp/optvenv && /tmp/optvenv/bin/pip install torch==2.13.0 optimum-onnx onnxruntime
    # save MistralForCausalLM(MistralConfig(..., num_hidden_layers=L)) to /tmp/optmodel/lL, L = 1, 2
    /tmp/optvenv/bin/optimum-cli export onnx --model /tmp/optmodel/lL --task text-generation-with-past /tmp/optout/lL
    .venv/bin/python benchmarks/graph_size_vs_optimum.py --optimum-1-layer /tmp/optout/l1 --optimum-2-layers /tmp/optout/l2

Writes graph_size_vs_optimum.json and .md (with the git commit, command, versions and machine) to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from mistral_export.engines.onnxruntime.artifact import write_onnxruntime_artifact
from mistral_export.export.onnx_export import export_onnx
from mistral_export.model.checkpoint import random_model
from mistral_export.model.config import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import RESULTS, provenance
from provenance import markdown as provenance_markdown


def node_counts(path: Path) -> tuple[int, collections.Counter]:
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    return len(nodes), collections.Counter(n.op_type for n in nodes)


def after_ort(path: Path, level: ort.GraphOptimizationLevel) -> tuple[int, collections.Counter]:
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return node_counts(Path(options.optimized_model_filepath))


def config_of(optimum_dir: Path) -> ModelConfig:
    from transformers import MistralConfig  # here, so decode_cpu.py can use the counters without transformers

    hf = MistralConfig.from_pretrained(optimum_dir)
    return ModelConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads,
        head_dim=hf.head_dim,
        sliding_window=hf.sliding_window,
        max_context=hf.max_position_embeddings,
        name=f"{hf.num_hidden_layers}-layer",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimum-1-layer", type=Path, required=True)
    parser.add_argument("--optimum-2-layers", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=RESULTS / "graph_size_vs_optimum")
    args = parser.parse_args()
    origin = provenance(("torch", "onnx", "onnxruntime", "onnxscript"))

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        ours = {}
        for layers, optimum_dir in ((1, args.optimum_1_layer), (2, args.optimum_2_layers)):
            config = config_of(optimum_dir)
            path = export_onnx(random_model(config), Path(tmp) / f"l{layers}")
            ours[layers] = {
                "model.onnx": path,
                "model.ort.onnx": write_onnxruntime_artifact(path),
                "optimum model.onnx": optimum_dir / "model.onnx",
            }
        for name in ours[1]:
            for stage, count in (
                ("as exported", lambda p: node_counts(p)),
                ("after ORT_ENABLE_EXTENDED", lambda p: after_ort(p, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)),
            ):
                (n1, c1), (n2, c2) = count(ours[1][name]), count(ours[2][name])
                per_layer = c2 - c1
                rows[f"{name}, {stage}"] = {
                    "per_layer": n2 - n1,
                    "total_1_layer": n1,
                    "per_layer_ops": dict(sorted(per_layer.items(), key=lambda kv: -kv[1])),
                }
    for key, row in rows.items():
        print(
            f"{key:55s} per layer {row['per_layer']:4d}   1-layer total {row['total_1_layer']:4d}   {row['per_layer_ops']}"
        )
    args.out.with_suffix(".json").write_text(json.dumps({"provenance": origin, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, origin, config_of(args.optimum_1_layer)))


def markdown(rows: dict, origin: dict, config: ModelConfig) -> str:
    lines = [
        "# Nodes per layer: mistral-export vs Optimum, same Mistral config",
        "",
        provenance_markdown(origin),
        f"Config: vocab {config.vocab_size}, hidden {config.hidden_size}, {config.num_heads} query / "
        f"{config.num_kv_heads} KV heads, head_dim {config.head_dim}, window {config.sliding_window}; per layer = "
        "nodes(2 layers) - nodes(1 layer), CPU provider. Per-op detail: `graph_size_vs_optimum.json`.",
        "",
        "| graph, stage | nodes per layer | nodes, 1 layer |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {key} | {row['per_layer']} | {row['total_1_layer']} |" for key, row in rows.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
