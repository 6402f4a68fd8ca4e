"""The pipeline behind `mistral-export build`: tokenizer, export + precision, then the engine, into one build folder.

    build("tiny", "build/tiny")                                    # fp32 ONNX Runtime artifact
    build("ckpt/", "out/", "fp16", backend="auto", engine_options=EngineOptions(max_batch=4))

Stages (recorded in DIR/build.json with the key of their inputs and the signature of their outputs):

    tokenizer                      DIR/tokenizer.json            checkpoint's tokenizer (sentencepiece converted once)
    onnx/<precision>               DIR/onnx/<p>/model.onnx(.data) checkpoint, config, precision options, tool versions
    onnxruntime/<precision>        DIR/onnx/<p>/model.ort.onnx, artifact.json       the ONNX above, ONNX Runtime version
    tensorrt/<gpu>-sm<cc>/<p>      DIR/engines/<gpu>-sm<cc>/<p>/model.plan, artifact.json   the ONNX above, engine
                                   options, GPU, TensorRT version

A stage whose key and outputs are unchanged is skipped; a stage writes under temporary names and renames when
complete, its artifact.json last; build.json is rewritten (atomically) after every stage, so an interrupted build
keeps what it finished. One build at a time writes into a folder (folder_lock: a second one waits, or with
wait=False refuses), and each save re-reads build.json and changes only the stages this build touched, so no
writer's record is ever lost. One build folder holds one checkpoint and any number of precisions and engines: artifacts
made from another checkpoint are removed when the checkpoint changes. Layout: artifacts/folder.py; artifact.json:
artifacts/description.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from mistral_export import tensorrt_lib
from mistral_export.artifacts.description import BACKENDS, DESCRIPTION_FILE
from mistral_export.artifacts.folder import BUILD_FILE, TOKENIZER_FILE, onnx_dir, tensorrt_dir
from mistral_export.engines.onnxruntime.artifact import ORT_DATA_FILE, ORT_MODEL_FILE, write_onnxruntime_artifact
from mistral_export.engines.tensorrt.builder import PLAN_FILE, EngineOptions
from mistral_export.errors import MistralExportError
from mistral_export.export.onnx_export import DATA_FILE, MODEL_FILE
from mistral_export.export.precision import (
    CALIBRATED,
    DEFAULT_SMOOTHQUANT_ALPHA,
    calibration_options,
    check_precision,
    export_precision,
    opset_for,
)
from mistral_export.export.precision.int4 import DEFAULT_BLOCK_SIZE
from mistral_export.files import file_sha256, package_version, read_json, tool_version, write_json_atomic
from mistral_export.folder_lock import folder_lock
from mistral_export.model.checkpoint import find_weight_files
from mistral_export.model.config import load_config, resolve_model_dir
from mistral_export.model.tokenizer import find_tokenizer_source, write_tokenizer_json
from mistral_export.model.transformer import Transformer
from mistral_export.op_contract import DEFAULT_PLUGIN_IMPL
from mistral_export.pipeline import stages
from mistral_export.pipeline.progress import BuildProgress

BUILD_BACKENDS = ("auto", *BACKENDS)  # auto: TensorRT where it and a GPU are present
BUILD_FORMAT = 1


@dataclass(frozen=True)
class PrecisionOptions:
    """The quantized precisions' options (`export` and `build` share their names)."""

    smoothquant_alpha: float | None = DEFAULT_SMOOTHQUANT_ALPHA  # None: plain W8A8 (--no-smoothquant)
    awq: bool = True  # int4-awq; False: plain round-to-nearest (--no-awq)
    int4_block_size: int = DEFAULT_BLOCK_SIZE
    calib_data: Path | None = None  # plain text or JSONL with a `text` field; None: the packaged calibration text
    calib_samples: int | None = None
    calib_seq_len: int | None = None
    calib_device: str | None = None  # where calibration runs (cpu, cuda): not in the key, the result is the same

    def key(self, precision: str) -> dict:
        if precision not in CALIBRATED:
            return {}
        data = Path(self.calib_data) if self.calib_data else None
        if data is not None and not data.is_file():
            raise MistralExportError(f"--calib-data {data}: no such file")
        key = {
            "calib_samples": self.calib_samples,
            "calib_seq_len": self.calib_seq_len,
            "calib_data_sha256": file_sha256(data) if data else None,
        }
        if precision == "int8":
            key["smoothquant_alpha"] = self.smoothquant_alpha
        if precision == "int4-awq":
            key.update(awq=self.awq, int4_block_size=self.int4_block_size)
        return key


def choose_backend(requested: str) -> tuple[str, str | None, str]:
    """(backend, why TensorRT is unavailable or None, the reason to print) for --backend REQUESTED."""
    if requested not in BUILD_BACKENDS:
        raise MistralExportError(f"--backend must be one of {', '.join(BUILD_BACKENDS)}, got '{requested}'")
    if requested == "onnxruntime":
        return "onnxruntime", None, "requested"
    problem = tensorrt_lib.unavailable_reason()
    if requested == "tensorrt":
        return "tensorrt", problem, "requested"
    if problem is None:
        gpu = tensorrt_lib.this_gpu()
        return "tensorrt", None, f"TensorRT {gpu.tensorrt_version} and {gpu.name} found"
    return "onnxruntime", None, f"{problem}; the ONNX Runtime artifact runs anywhere"


def build(
    model: Transformer | str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    backend: str = "onnxruntime",
    *,
    opset: int | None = None,
    last_token_logits: bool = False,
    plugin_impl: str = DEFAULT_PLUGIN_IMPL,
    precision_options: PrecisionOptions | None = None,
    engine_options: EngineOptions | None = None,
    progress: BuildProgress | None = None,
    wait: bool = True,
) -> Path:
    """Build MODEL (a checkpoint folder, `tiny`, or an in-memory Transformer) into OUT_DIR; returns OUT_DIR.

    build.json's `last_run` lists each stage of this call as built or skipped. Another build writing into OUT_DIR:
    wait for it (and say so), or with wait=False raise a MistralExportError.
    """
    check_precision(precision)
    opset = opset_for(precision, opset)  # recorded as the number it is
    engine_options = engine_options or EngineOptions()
    engine_options.check()
    precision_options = precision_options or PrecisionOptions()
    chosen, problem, why = choose_backend(backend)
    if chosen == "tensorrt" and problem is None:  # before any work: a precision this GPU cannot run
        from mistral_export.engines.tensorrt.precision_support import check_tensorrt_precision

        gpu = tensorrt_lib.this_gpu()
        check_tensorrt_precision(precision, gpu.name, gpu.compute_capability)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MistralExportError(f"{out}: the build folder is a file")
    out.mkdir(parents=True, exist_ok=True)
    shown = progress or BuildProgress(quiet=True)
    with folder_lock(out, "build", wait=wait, on_wait=shown.note), shown:
        stages.remove_stale_staging(out)  # under the lock: another build's staging files are live
        if backend == "auto":
            shown.note(f"backend: {chosen} ({why})")
        pipeline = _Pipeline(model, out, shown)
        pipeline.tokenizer()
        onnx_entry = pipeline.onnx(precision, opset, last_token_logits, plugin_impl, precision_options)
        if chosen == "onnxruntime":
            pipeline.onnxruntime(precision, onnx_entry)
        elif problem is not None:
            pipeline.save()
            raise MistralExportError(
                f"--backend tensorrt: {problem}; install it with {tensorrt_lib.INSTALL_HINT} (the ONNX stage's output "
                f"{onnx_dir(out, precision)} is kept)"
            )
        else:
            pipeline.tensorrt(precision, onnx_entry, engine_options, plugin_impl)
        pipeline.save()
    return out


class _Pipeline:
    def __init__(self, model: Transformer | str | Path, out: Path, progress: BuildProgress):
        self.model = model
        self.out = out
        self.progress = progress
        self.run_log: list[dict] = []
        self.in_memory = isinstance(model, Transformer)
        self.config = model.config if self.in_memory else load_config(model)
        self.folder = None if self.in_memory else resolve_model_dir(model)
        if not self.in_memory and self.folder is None:
            raise MistralExportError(
                f"preset '{model}' has shapes only, no weights; pass a checkpoint folder or 'tiny'"
            )
        self.record = self._read_record()
        self.changed: set[str] = set()  # stages this build wrote or removed: the only ones its saves change
        self._fingerprint_checkpoint()

    # --- bookkeeping ------------------------------------------------------------------------------------------

    def _fingerprint_checkpoint(self) -> None:
        known = self.record.get("model", {}).get("files")
        if self.in_memory:
            digest = stages.key_of({name: file_bytes_sha256(p) for name, p in self.model.state_dict().items()})
            files, checkpoint = {}, stages.key_of({"config": self.config.to_hf_dict(), "weights": digest})
        else:
            names = [p for p in (self.folder / "config.json", self.folder / "params.json") if p.exists()]
            names += find_weight_files(self.folder)
            names += sorted(self.folder.glob("*.safetensors.index.json"))
            listed = [(path.name, path) for path in names]
            total = sum(path.stat().st_size for _, path in listed)
            with self.progress.bar("hashing the checkpoint", total) as advance:
                files = stages.hash_files(listed, known, on_bytes=advance)
            checkpoint = stages.combined_sha256(files)
        source = None if self.in_memory else ("tiny" if str(self.model) == "tiny" else str(Path(self.model).resolve()))
        if self.record.get("model", {}).get("checkpoint_sha256") not in (None, checkpoint):
            self._drop(lambda name, entry: name != "tokenizer", "made from another checkpoint")
        self.record["model"] = {
            "source": source,
            "name": self.config.name,
            "config": self.config.to_hf_dict(),
            "checkpoint_sha256": checkpoint,
            "files": files,
        }
        self.checkpoint = checkpoint

    def _read_record(self) -> dict:
        previous = read_json(self.out / BUILD_FILE, BUILD_FILE) if (self.out / BUILD_FILE).exists() else {}
        record = previous if previous.get("format") == BUILD_FORMAT else {}
        record.setdefault("stages", {})
        return record

    def _drop(self, which: Callable[[str, dict], bool], why: str) -> None:
        """Remove the recorded stages WHICH selects, and their outputs (artifact.json first: the completeness marker)."""
        for name, entry in list(self.record["stages"].items()):
            if not which(name, entry):
                continue
            for output in sorted(entry.get("outputs", {}), key=lambda o: not o.endswith(DESCRIPTION_FILE)):
                (self.out / output).unlink(missing_ok=True)
            del self.record["stages"][name]
            self.changed.add(name)
            self.progress.note(f"[yellow]removed {name}[/yellow] ({why})")

    def save(self) -> None:
        # Re-read, then apply only this build's changes: build.json is never rewritten from a stale copy (the folder
        # lock makes builds take turns; this keeps a record written by anyone else between two saves).
        ours = self.record["stages"]
        stages_done = self._read_record()["stages"]
        for name in self.changed:
            if name in ours:
                stages_done[name] = ours[name]
            else:
                stages_done.pop(name, None)
        self.record["stages"] = stages_done
        artifacts = sorted(
            {str(Path(o).parent) for e in stages_done.values() for o in e["outputs"] if o.endswith(DESCRIPTION_FILE)}
        )
        precisions: dict[str, dict] = {}
        for entry in stages_done.values():
            if "precision" in entry:
                slot = precisions.setdefault(entry["precision"], {})
                folder = str(Path(next(iter(entry["outputs"]))).parent)
                slot.setdefault(entry["kind"], []).append(folder)
        write_json_atomic(
            self.out / BUILD_FILE,
            {
                "format": BUILD_FORMAT,
                "tool_version": tool_version(),
                "model": self.record["model"],
                "artifacts": artifacts,
                "precisions": precisions,
                "stages": stages_done,
                "last_run": self.run_log,
            },
        )

    def _stage(
        self, name: str, inputs: dict, what: str, make: Callable[[], tuple[list[Path], dict]], **details
    ) -> dict:
        key = stages.key_of(inputs)
        previous = self.record["stages"].get(name)
        if previous and previous.get("key") == key and stages.outputs_intact(self.out, previous["outputs"]):
            self.progress.skipped(name)
            self.run_log.append({"stage": name, "action": "skipped"})
            return previous
        started = time.perf_counter()
        with self.progress.stage(name, what):
            if previous:  # its outputs are about to be replaced: never leave them recorded as current
                del self.record["stages"][name]
                self.changed.add(name)
                self.save()
            outputs, produced = make()
        seconds = round(time.perf_counter() - started, 2)
        entry = {
            "key": key,
            **details,
            "inputs": inputs,
            "outputs": stages.record_outputs(self.out, outputs),
            "seconds": seconds,
            **produced,
        }
        self.record["stages"][name] = entry
        self.changed.add(name)
        self.run_log.append({"stage": name, "action": "built", "seconds": seconds})
        self.save()
        return entry

    # --- stages -----------------------------------------------------------------------------------------------

    def tokenizer(self) -> None:
        source = None if self.in_memory else find_tokenizer_source(self.folder)
        if source is None:
            return
        inputs = {
            "source": source.name,
            "sha256": file_sha256(source),
            "tool": stages.tool_fingerprint(),
            "tokenizers": package_version("tokenizers"),
            "sentencepiece": package_version("sentencepiece"),
        }

        def make():
            target = self.out / TOKENIZER_FILE
            write_tokenizer_json(source, target)
            return [target], {}

        self._stage("tokenizer", inputs, f"{TOKENIZER_FILE} from {source.name}", make)

    def onnx(
        self,
        precision: str,
        opset: int | None,
        last_token_logits: bool,
        plugin_impl: str,
        precision_options: PrecisionOptions,
    ) -> dict:
        folder = onnx_dir(self.out, precision)
        inputs = {
            "checkpoint": self.checkpoint,
            "config": self.config.to_hf_dict(),
            "precision": precision,
            "opset": opset,
            "last_token_logits": last_token_logits,
            "plugin_impl": plugin_impl,
            "precision_options": precision_options.key(precision),
            "tool": stages.tool_fingerprint(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxscript": package_version("onnxscript"),
        }

        def make():
            for dependent in (DESCRIPTION_FILE, ORT_MODEL_FILE, ORT_DATA_FILE):  # they describe the ONNX being replaced
                (folder / dependent).unlink(missing_ok=True)
            model_path = export_with_options(
                self.model, folder, precision, opset, last_token_logits, plugin_impl, precision_options, self.progress
            )
            return [model_path, folder / DATA_FILE], {"onnx_sha256": file_sha256(model_path)}

        entry = self._stage(
            f"onnx/{precision}", inputs, f"export and {precision}", make, kind="onnx", precision=precision
        )
        # Engines built from an earlier ONNX of this precision (other options, another GPU's build) are stale now.
        self._drop(
            lambda name, e: (
                e.get("upstream") == f"onnx/{precision}" and e.get("inputs", {}).get("onnx") != entry["key"]
            ),
            f"built from an earlier onnx/{precision}",
        )
        return entry

    def onnxruntime(self, precision: str, onnx_entry: dict) -> dict:
        folder = onnx_dir(self.out, precision)
        inputs = {"onnx": onnx_entry["key"], "onnxruntime": ort.__version__, "tool": stages.tool_fingerprint()}

        def make():
            description = write_onnxruntime_artifact(folder / MODEL_FILE)
            own_data = description.onnxruntime.own_data
            return [folder / ORT_MODEL_FILE, *([folder / own_data] if own_data else []), folder / DESCRIPTION_FILE], {}

        return self._stage(
            f"onnxruntime/{precision}",
            inputs,
            f"ONNX Runtime artifact {ORT_MODEL_FILE}",
            make,
            kind="onnxruntime",
            precision=precision,
            upstream=f"onnx/{precision}",
        )

    def tensorrt(self, precision: str, onnx_entry: dict, options: EngineOptions, plugin_impl: str) -> dict:
        from mistral_export.engines.tensorrt import builder

        gpu = tensorrt_lib.this_gpu()
        folder = tensorrt_dir(self.out, gpu.folder_name, precision)
        model_path = onnx_dir(self.out, precision) / MODEL_FILE
        inputs = {
            "onnx": onnx_entry["key"],
            "engine": options.key(),
            "gpu": gpu.name,
            "compute_capability": gpu.compute_capability,
            "tensorrt": gpu.tensorrt_version,
            "tool": stages.tool_fingerprint(),
        }

        def make():
            for stale in (DESCRIPTION_FILE, PLAN_FILE):
                (folder / stale).unlink(missing_ok=True)
            with stages.staging_folder(self.out / "engines", gpu.folder_name) as staging:
                plan, description = builder.build_engine(
                    model_path,
                    staging,
                    precision=precision,
                    options=options,
                    plugin_impl=plugin_impl,
                    progress=self.progress.bars,
                )
                folder.mkdir(parents=True, exist_ok=True)
                os.replace(plan, folder / PLAN_FILE)
            description.write(folder)
            return [folder / PLAN_FILE, folder / DESCRIPTION_FILE], {}

        return self._stage(
            f"tensorrt/{gpu.folder_name}/{precision}",
            inputs,
            f"TensorRT engine for {gpu.name} ({precision})",
            make,
            kind="tensorrt",
            precision=precision,
            upstream=f"onnx/{precision}",
        )


def file_bytes_sha256(tensor: torch.Tensor) -> str:
    import hashlib

    data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return hashlib.sha256(str((tuple(tensor.shape), str(tensor.dtype))).encode() + data).hexdigest()


def export_with_options(
    model,
    folder: Path,
    precision: str,
    opset: int | None,
    last_token_logits: bool,
    plugin_impl: str,
    options: PrecisionOptions,
    progress: BuildProgress,
) -> Path:
    """The export + precision stage as `export` and `build` both run it."""
    return export_precision(
        model,
        folder,
        precision,
        opset=opset,
        last_token_logits=last_token_logits,
        plugin_impl=plugin_impl,
        progress=progress.bars,
        smoothquant_alpha=options.smoothquant_alpha,
        awq=options.awq,
        int4_block_size=options.int4_block_size,
        calibration=calibration_options(
            options.calib_data, options.calib_samples, options.calib_seq_len, options.calib_device
        ),
    )
