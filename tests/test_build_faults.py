"""Builds that race, are killed, or run out of space: real `mistral-export` processes on the tiny fixture or a small
random checkpoint, each ending with a folder that the next build completes, or that says what went wrong."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from mistral_export.artifacts.folder import read_build
from mistral_export.cli import app
from mistral_export.deploy.repository import package
from mistral_export.files import file_sha256
from mistral_export.folder_lock import LOCK_FILE, folder_lock
from mistral_export.pipeline import stages

from conftest import needs_tiny

CLI = [sys.executable, "-m", "mistral_export.cli"]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.1)


def build_command(model, out: Path, precision: str, *extra: str) -> list[str]:
    return [*CLI, "build", str(model), "-o", str(out), "--precision", precision, "--backend", "onnxruntime", *extra]


@needs_tiny
def test_two_builds_into_one_folder_take_turns_and_both_are_recorded(tmp_path):
    out = tmp_path / "build"
    logs = {p: tmp_path / f"{p}.log" for p in ("fp32", "fp16")}
    with folder_lock(out, "test"):  # both builds start while the folder is taken, then race for it
        builds = {
            p: subprocess.Popen(build_command("tiny", out, p), stdout=subprocess.DEVNULL, stderr=logs[p].open("w"))
            for p in logs
        }
        wait_for(
            lambda: all("waiting for another build" in log.read_text() for log in logs.values()),
            120,
            "both builds to say they wait",
        )
        assert f"pid {os.getpid()}" in logs["fp32"].read_text()  # they name who holds the folder
        refused = CliRunner().invoke(app, ["build", "tiny", "-o", str(out), "--no-wait"])
        assert refused.exit_code == 2
        assert [line for line in refused.output.splitlines() if line.startswith("error:")] == [
            line for line in refused.output.splitlines() if line.strip()
        ]
        assert "another build is writing here" in refused.output
    for precision, process in builds.items():
        assert process.wait(timeout=300) == 0, logs[precision].read_text()
    record = read_build(out)
    expected = {"tokenizer", "onnx/fp32", "onnx/fp16", "onnxruntime/fp32", "onnxruntime/fp16"}
    assert set(record["stages"]) == expected
    for entry in record["stages"].values():
        assert stages.outputs_intact(out, entry["outputs"])
    assert set(record["precisions"]) == {"fp32", "fp16"}
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    rows = {line.split("  ")[0]: line for line in shown.output.splitlines()}
    for precision in ("fp32", "fp16"):
        assert f"onnx/{precision}/model.onnx" in rows[f"onnx {precision}"] and "opset 20" in rows[f"onnx {precision}"]
        assert f"onnx/{precision}/model.ort.onnx" in rows[f"onnxruntime {precision}"]


@needs_tiny
def test_package_into_a_taken_repository_waits_or_refuses(tiny_build, tmp_path):
    repository = tmp_path / "repository"
    with folder_lock(repository, "test"):
        log = tmp_path / "package.log"
        waiting = subprocess.Popen(
            [*CLI, "package", str(tiny_build), "-o", str(repository), "--name", "tiny"],
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
        )
        wait_for(lambda: "waiting for another package" in log.read_text(), 120, "package to say it waits")
        assert not (repository / "tiny").exists()
        refused = CliRunner().invoke(app, ["package", str(tiny_build), "-o", str(repository), "--no-wait"])
        assert refused.exit_code == 2 and "another package is writing here" in refused.output
    assert waiting.wait(timeout=120) == 0, log.read_text()
    assert (repository / "tiny" / "config.pbtxt").is_file()
    assert package(tiny_build, repository, name="tiny", wait=False)  # free again once the first one has finished


def artifact_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file a build leaves, artifact.json without its one measured field (build seconds)."""
    hashes = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file() or path.name in ("build.json", LOCK_FILE):
            continue
        name = str(path.relative_to(out))
        if path.name == "artifact.json":
            document = json.loads(path.read_text())
            document.pop("build_seconds")
            hashes[name] = json.dumps(document, sort_keys=True)
        else:
            hashes[name] = file_sha256(path)
    return hashes


def build_killed_at(command: list[str], marker: str) -> str:
    """Start COMMAND, SIGKILL it as soon as a stderr line starts with MARKER (after strip); returns its stderr."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in process.stderr:
            lines.append(line)
            if line.strip().startswith(marker):
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the build ended before {marker!r}:\n{''.join(lines)}"
    return "".join(lines)


@needs_tiny
def test_build_killed_in_each_stage_resumes_to_the_same_artifacts(tmp_path):
    """SIGKILL during the tokenizer, the ONNX export, the int8 calibration and the ONNX Runtime artifact, one after the
    other into one folder (each next build resumes the previous one's folder), then one build that finishes: its
    files are byte for byte an uninterrupted build's."""
    calibration = ("--calib-samples", "2", "--calib-seq-len", "40")
    reference, out = tmp_path / "reference", tmp_path / "interrupted"
    subprocess.run(build_command("tiny", reference, "int8", *calibration), check=True, capture_output=True)
    command = build_command("tiny", out, "int8", *calibration)
    # Each stage announces its start ("… STAGE: ...") and its log lines ("  STAGE: ...") where stderr is a pipe.
    interrupted_in = {}
    for marker, stage in [
        ("… tokenizer", "tokenizer"),
        ("onnx/int8: calibration", "onnx/int8"),
        ("onnx/int8: tracing", "onnx/int8"),
        ("… onnxruntime/int8", "onnxruntime/int8"),
    ]:
        build_killed_at(command, marker)
        recorded = read_build(out)["stages"] if (out / "build.json").exists() else {}
        interrupted_in[marker] = stage not in recorded  # the 20 ms tokenizer stage may finish before the kill lands
    assert interrupted_in["onnx/int8: calibration"] and interrupted_in["onnx/int8: tracing"], interrupted_in
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert "skipped" in finished.stderr  # it resumed: the stages finished before the last kill were kept
    assert artifact_hashes(out) == artifact_hashes(reference)
    assert not [p for p in out.rglob("*") if p.name.startswith((".staging-", ".export-")) or p.name.endswith(".tmp")]


def limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@needs_tiny
def test_a_write_failing_for_lack_of_space_is_one_error_line_and_leaves_no_final_name(tmp_path):
    out = tmp_path / "build"
    result = subprocess.run(
        build_command("tiny", out, "fp32"), capture_output=True, text=True, preexec_fn=limit_file_size(2 << 20)
    )  # tokenizer.json fits, model.onnx.data (12.8 MiB) not
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "File too large" in errors[0], result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    assert not list(out.rglob("model*"))
    assert set(read_build(out)["stages"]) == {"tokenizer"}
    finished = subprocess.run(build_command("tiny", out, "fp32"), capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
