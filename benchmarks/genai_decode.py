"""onnxruntime-genai's side of benchmarks/decode_cpu.py: builds its export of a checkpoint and times its decode steps.

Runs in its own venv (onnxruntime-genai pins its own onnxruntime): decode_cpu.py creates it as
benchmarks/.venv-genai (see `genai_python` there) and drives this script as a worker, so both sides'
steps are timed in the same run, interleaved:

    build HF_FOLDER OUT PRECISION THREADS     the builder (`onnxruntime_genai.models.builder`, CPU)
    serve                                     then JSON lines on stdin, one reply per line on stdout:
        {"load": NAME, "folder": DIR, "max_length": N}
        {"prefill": NAME, "context": N, "chunk": 256}   prefill N tokens (chunked) so the next steps run at past N
        {"steps": NAME, "count": K}                     K decode steps; replies their seconds
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def build(hf_folder: str, out: str, precision: str, threads: int) -> None:
    cache = Path(out).with_name(Path(out).name + ".cache")
    # int4: accuracy level 4 (int8 compute), its fastest on CPU, named rather than left to the builder's default.
    extra = ["--extra_options", "int4_accuracy_level=4"] if precision == "int4" else []
    subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            hf_folder,
            "-o",
            out,
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            str(cache),
            *extra,
        ],
        check=True,
    )
    config_path = Path(out) / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    config_path.write_text(json.dumps(config, indent=2))


def serve() -> None:
    import onnxruntime_genai as og

    models, generators = {}, {}
    for line in sys.stdin:
        request = json.loads(line)
        if "load" in request:
            name = request["load"]
            models[name] = og.Model(request["folder"]), request["max_length"]
            reply = {"ok": True, "version": og.__version__}
        elif "prefill" in request:
            name = request["prefill"]
            model, max_length = models[name]
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=max_length, do_sample=False)
            generator = og.Generator(model, params)
            context, chunk = request["context"], request.get("chunk", 256)
            for start in range(0, context, chunk):
                generator.append_tokens([[7 + (i % 97) for i in range(start, min(context, start + chunk))]])
            generators[name] = generator
            reply = {"ok": True}
        else:
            generator = generators[request["steps"]]
            times = []
            for _ in range(request["count"]):
                started = time.perf_counter()
                generator.generate_next_token()
                times.append(time.perf_counter() - started)
            reply = {"seconds": times}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        serve()
