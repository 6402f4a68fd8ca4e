"""`mistral-export validate` and `bench` on the fixture's builds: a good build passes with a report of the documented
shape; deliberately broken artifacts fail with exit code 1 and a report naming the failing cases."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mistral_export.artifacts.folder import BUILD_FILE
from mistral_export.cli import app
from mistral_export.errors import MistralExportError
from mistral_export.model.checkpoint import load_model, random_model, save_hf_checkpoint
from mistral_export.pipeline.build import build
from mistral_export.runners.base import EagerRunner
from mistral_export.validate import cases
from mistral_export.validate.metrics import aggregate, checks, compare_rows, greedy_match
from mistral_export.validate.suite import torch_threads
from mistral_export.validate.texts import read_prompts
from mistral_export.validate.thresholds import THRESHOLDS

from conftest import needs_tiny, small_config

pytestmark = needs_tiny
W = 64  # the fixture's window

NUMBER = (int, float)
OPTIONAL_NUMBER = (int, float, type(None))
OPTIONAL_STR = (str, type(None))
TIMING = {
    "name": str,
    "kind": str,
    "batch": int,
    "tokens": int,
    "label": str,
    "samples": int,
    "p50_ms": NUMBER,
    "p90_ms": NUMBER,
    "p99_ms": NUMBER,
    "min_ms": NUMBER,
    "tokens_per_s": NUMBER,
}
CASE = {
    "name": str,
    "kind": str,
    "passed": bool,
    "detail": dict,
    "error": OPTIONAL_STR,
    "metrics": {"positions": int, "nonfinite_logits": int},
    "checks": [{"metric": str, "bound": OPTIONAL_NUMBER, "kind": str, "passed": bool}],
    "per_position": {"position": [int], "max_abs_diff": [OPTIONAL_NUMBER], "top1_agree": [bool]},
}
REPORT_SCHEMA = {
    "format": int,
    "kind": str,
    "passed": bool,
    "created": str,
    "command": OPTIONAL_STR,
    "seconds": NUMBER,
    "warnings": [str],
    "build": {
        "dir": str,
        "model_source": str,
        "model_name": str,
        "window": (int, type(None)),
        "cache_capacity": int,
        "boundary_W": int,
        "vocab_size": int,
    },
    "options": {"quick": bool, "precision": OPTIONAL_STR, "prompts": OPTIONAL_STR, "threads": int, "tokens_from": str},
    "tool": {"name": str, "version": str, "git_commit": OPTIONAL_STR, "git_dirty": (bool, type(None))},
    "versions": {"torch": str, "onnxruntime": str, "onnx": str, "numpy": str},
    "machine": {
        "cpu": str,
        "cpu_count": int,
        "memory_bytes": (int, type(None)),
        "gpu": OPTIONAL_STR,
        "platform": str,
        "python": str,
        "load_average": ([NUMBER], type(None)),
    },
    "plots": [{"file": str, "title": str, "width": int, "height": int}],
    "artifacts": [
        {
            "label": str,
            "backend": str,
            "precision": str,
            "folder": str,
            "skipped": OPTIONAL_STR,
            "passed": bool,
            "thresholds": dict,
            "cases": [CASE],
            "latency": {
                "artifact": [TIMING],
                "eager": [TIMING],
                "ratios": [{"name": str, "p50": NUMBER, "tokens_per_s": NUMBER}],
            },
            "memory": {
                "process_peak_rss_bytes": int,
                "peak_scope": str,
                "artifact": {"weights_bytes": int, "kv_cache_bytes_per_sequence": int},
                "eager": {"weights_bytes": int, "kv_cache_bytes_per_sequence": int},
                "ratios": dict,
            },
        }
    ],
}


def check_schema(value, schema, path="report"):
    if isinstance(schema, dict):
        assert isinstance(value, dict), f"{path}: expected an object, got {type(value).__name__}"
        for key, sub in schema.items():
            assert key in value, f"{path}.{key} is missing"
            check_schema(value[key], sub, f"{path}.{key}")
    elif isinstance(schema, list):
        assert isinstance(value, list), f"{path}: expected a list, got {type(value).__name__}"
        for i, item in enumerate(value):
            check_schema(item, schema[0], f"{path}[{i}]")
    elif isinstance(schema, tuple) and any(isinstance(s, list) for s in schema):
        if value is not None:
            check_schema(value, next(s for s in schema if isinstance(s, list)), path)
    else:
        assert isinstance(value, schema), f"{path}: {value!r} is not {schema}"


def strict_json(path: Path) -> dict:
    def refuse(constant):
        raise AssertionError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def validate(*args: str):
    return CliRunner().invoke(app, ["validate", *map(str, args), "--quick", "--threads", "1"])


@pytest.fixture(scope="module")
def two_precision_build(tmp_path_factory) -> Path:
    """The fixture in fp32 and fp16 (conftest's tiny_build has fp32 alone)."""
    out = tmp_path_factory.mktemp("build")
    build("tiny", out, "fp32")
    build("tiny", out, "fp16")
    return out


@pytest.fixture(scope="module")
def quick_run(two_precision_build, tmp_path_factory):
    report_dir = tmp_path_factory.mktemp("report")
    result = validate(two_precision_build, "--report-dir", report_dir)
    return result, report_dir


def copy_build(src: Path, dst: Path, precision: str = "fp32") -> Path:
    """A build folder with one artifact, copied (weights too), to break."""
    (dst / "onnx").mkdir(parents=True)
    for name in (BUILD_FILE, "tokenizer.json"):
        shutil.copyfile(src / name, dst / name)
    shutil.copytree(src / "onnx" / precision, dst / "onnx" / precision)
    return dst / "onnx" / precision


def edit_weight(folder: Path, name: str, change) -> None:
    """Rewrite one initializer in the external data that model.onnx and model.ort.onnx both read."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    info = {e.key: e.value for e in next(i for i in model.graph.initializer if i.name == name).external_data}
    offset, length = int(info["offset"]), int(info["length"])
    with open(folder / info["location"], "r+b") as handle:
        handle.seek(offset)
        values = np.frombuffer(handle.read(length), dtype=np.float32).copy()
        handle.seek(offset)
        handle.write(change(values).astype(np.float32).tobytes())


def failing(report: dict) -> list[dict]:
    return [c for a in report["artifacts"] for c in a["cases"] if not c["passed"]]


def test_validate_passes_on_the_fixture_builds(quick_run):
    result, report_dir = quick_run
    assert result.exit_code == 0, result.output
    report = strict_json(report_dir / "report.json")
    assert report["passed"] and [a["label"] for a in report["artifacts"]] == ["onnxruntime/fp16", "onnxruntime/fp32"]
    assert "mistral-export validate: PASS" in result.stdout and "onnxruntime/fp16" in result.stdout
    for artifact in report["artifacts"]:
        assert artifact["thresholds"] == THRESHOLDS[artifact["precision"]]
        kinds = {c["kind"] for c in artifact["cases"]}
        assert kinds == {"prefill", "greedy", "decode", "chunked", "batched", "heldout", "pooled"}
        decode = sorted(c["per_position"]["position"][0] for c in artifact["cases"] if c["kind"] == "decode")
        assert decode == [W - 2, W - 1, W, W + 1, W + 2, 3 * W]
        chunks = sorted(c["detail"]["chunk"] for c in artifact["cases"] if c["kind"] == "chunked")
        assert min(chunks) < W < max(chunks)
        assert max(len(c["per_position"]["position"]) for c in artifact["cases"] if c["kind"] == "prefill") > W
        # Every bar of the precision is checked somewhere, with the value from thresholds.py.
        checked = {(c["metric"], c["bound"]) for case in artifact["cases"] for c in case["checks"]}
        assert set(THRESHOLDS[artifact["precision"]].items()) <= checked
    fp16 = report["artifacts"][0]
    greedy = next(c for c in fp16["cases"] if c["kind"] == "greedy")
    assert greedy["metrics"]["greedy_match_tokens"] >= THRESHOLDS["fp16"]["greedy_match_tokens"]
    heldout = next(c for c in fp16["cases"] if c["kind"] == "heldout")
    assert 0.98 < heldout["metrics"]["perplexity_ratio"] < 1.02 and heldout["metrics"]["positions"] > 1000


def test_report_json_matches_the_schema(quick_run):
    _, report_dir = quick_run
    report = strict_json(report_dir / "report.json")
    check_schema(report, REPORT_SCHEMA)
    assert report["tool"]["git_commit"] or report["tool"]["version"]
    for artifact in report["artifacts"]:
        for timing in artifact["latency"]["artifact"] + artifact["latency"]["eager"]:
            assert 0 < timing["min_ms"] <= timing["p50_ms"] <= timing["p90_ms"] <= timing["p99_ms"]
        contexts = [t["tokens"] for t in artifact["latency"]["artifact"] if t["kind"] == "decode" and t["batch"] == 1]
        assert contexts == [W // 2, W, 4 * W, 16 * W]
        assert {t["batch"] for t in artifact["latency"]["artifact"]} >= {1, 4}
    fp16, fp32 = report["artifacts"]
    assert (
        fp16["memory"]["artifact"]["kv_cache_bytes_per_sequence"] * 2
        == fp32["memory"]["artifact"]["kv_cache_bytes_per_sequence"]
    )


def test_report_markdown_and_plots(quick_run):
    _, report_dir = quick_run
    text = (report_dir / "report.md").read_text()
    first_lines = text.splitlines()[:8]
    assert first_lines[0] == "# mistral-export validate: PASS"
    assert any(line.startswith("| onnxruntime/fp32 | PASS") for line in first_lines)
    assert "(≤ 1.0e-04)" in text and "(≥ 99.0%)" in text and "(≥ 32)" in text  # bars beside the values
    report = strict_json(report_dir / "report.json")
    assert [p["file"] for p in report["plots"]] == ["decode_latency.png", "window_boundary.png"]
    for plot in report["plots"]:
        assert f"]({plot['file']})" in text
        with Image.open(report_dir / plot["file"]) as image:
            assert image.format == "PNG" and image.size == (plot["width"], plot["height"])
    assert report["plots"][0]["width"] == 900 and report["plots"][1]["height"] == 600


def test_negated_weight_fails_with_the_cases_named(two_precision_build, tmp_path):
    folder = copy_build(two_precision_build, tmp_path / "build")
    edit_weight(folder, "layers.1.feed_forward.w2.weight.T", lambda w: -w)
    result = validate(tmp_path / "build")
    assert result.exit_code == 1, result.output
    report = strict_json(tmp_path / "build" / "report" / "report.json")
    bad = failing(report)
    assert len(bad) >= 10 and all(
        any(c["metric"] == "max_abs_logit_diff" and not c["passed"] for c in case["checks"])
        for case in bad
        if case["kind"] != "pooled"
    )
    text = (tmp_path / "build" / "report" / "report.md").read_text()
    assert text.startswith("# mistral-export validate: FAIL")
    for case in bad:
        assert f"**onnxruntime/fp32** · {case['name']}: max_abs_logit_diff" in text
        assert f"FAIL onnxruntime/fp32 · {case['name']}" in result.stdout


def break_slot_arithmetic(model_path: Path) -> None:
    """The ONNX Runtime artifact tells GroupQueryAttention min(past_len, C - 1) tokens are cached instead of
    min(past_len, C): right until the cache is full, wrong from position W on (engines/onnxruntime/attention.py)."""
    artifact = model_path.parent / "model.ort.onnx"
    model = onnx.load(str(artifact), load_external_data=False)
    clamp = next(n for n in model.graph.node if n.op_type == "Min" and "past_len" in n.input)
    capacity = next(t for t in model.graph.initializer if t.name in clamp.input)
    capacity.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(capacity) - 1, capacity.name))
    onnx.save(model, str(artifact))


def test_broken_slot_arithmetic_fails_exactly_past_the_window(two_precision_build, tmp_path):
    folder = copy_build(two_precision_build, tmp_path / "build")
    break_slot_arithmetic(folder / "model.onnx")
    result = validate(tmp_path / "build")
    assert result.exit_code == 1, result.output
    report = strict_json(tmp_path / "build" / "report" / "report.json")
    bad = {c["name"] for c in failing(report)}
    assert {"decode at W (64)", "decode at W+1 (65)", "decode at 3W (192)"} <= bad
    for case in report["artifacts"][0]["cases"]:
        last = max(case["per_position"]["position"])
        if last < W:  # the cache is not full yet: every such case passes
            assert case["passed"], case["name"]
        if case["name"] in bad:
            assert last >= W, case["name"]
    assert {"decode at W-2 (62)", "decode at W-1 (63)"}.isdisjoint(bad)


def test_nan_in_one_layer_is_reported(two_precision_build, tmp_path):
    folder = copy_build(two_precision_build, tmp_path / "build")
    edit_weight(folder, "layers.2.feed_forward.w2.weight.T", lambda w: np.full_like(w, np.nan))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["def area(width, height):\n    return", "class Stack:\n"]))
    result = validate(tmp_path / "build", "--prompts", prompts)
    assert result.exit_code == 1, result.output
    report = strict_json(tmp_path / "build" / "report" / "report.json")  # NaN never reaches the JSON
    cases_ = report["artifacts"][0]["cases"]
    assert all(not c["passed"] and c["metrics"]["nonfinite_logits"] > 0 for c in cases_)
    assert all(c["metrics"]["max_abs_logit_diff"] is None for c in cases_)
    assert "nonfinite_logits" in (tmp_path / "build" / "report" / "report.md").read_text()
    prefills = [c["name"] for c in cases_ if c["kind"] == "prefill"]
    assert len(prefills) == 2 and prefills[0].startswith("prefill prompt 1 (")


def test_user_mistakes_exit_2(two_precision_build, tmp_path):
    missing = validate(tmp_path / "nothing")
    assert missing.exit_code == 2 and "no such build folder" in missing.output
    no_int8 = validate(two_precision_build, "--precision", "int8")
    assert no_int8.exit_code == 2 and "no int8 artifact" in no_int8.output

    other = tmp_path / "other-checkpoint"
    save_hf_checkpoint(random_model(small_config()), other)
    mismatched = validate(two_precision_build, "--model", other, "--precision", "fp32")
    assert mismatched.exit_code == 2, mismatched.output
    assert "num_hidden_layers: 4 in the artifact, 2 in the checkpoint" in " ".join(mismatched.output.split())


def test_in_memory_build_needs_model_and_runs_without_a_tokenizer(tmp_path):
    model = random_model(small_config(kv_heads=2))
    build(model, tmp_path / "build")
    save_hf_checkpoint(model, tmp_path / "checkpoint")
    unknown = validate(tmp_path / "build")
    assert unknown.exit_code == 2 and "pass --model CHECKPOINT" in unknown.output
    result = validate(tmp_path / "build", "--model", tmp_path / "checkpoint")
    assert result.exit_code == 0, result.output
    report = strict_json(tmp_path / "build" / "report" / "report.json")
    assert report["options"]["tokens_from"].startswith("random token ids")
    decode = sorted(c["per_position"]["position"][0] for c in report["artifacts"][0]["cases"] if c["kind"] == "decode")
    assert decode == [14, 15, 16, 17, 18, 48]  # W = 16


def test_batched_case_feeds_each_sequence_its_own_history():
    """The batched script's rows (shorter sequences re-run their first chunk while the others catch up) give the
    logits each sequence gets alone: the case checks real sequences at different positions."""
    with torch_threads(1):  # as validate runs it: two spinning threads crawl on a busy machine
        check_batched_rows(EagerRunner(load_model("tiny")))


def check_batched_rows(eager):
    text = torch.randint(3, 2048, (3 * W + 8,), generator=torch.Generator().manual_seed(0)).tolist()
    sequences = [text, text[5:] + text[:5], text[9:] + text[:9]]
    targets = [W // 2 - 1, W + 1, 3 * W]
    script = cases.batched_script(sequences, targets, W // 2, 2)
    eager.reset(3)
    generator, decoded = script.steps(), []
    step = next(generator)
    while True:
        logits = eager.step(step.input_ids, step.past_len)
        if step.case:
            decoded.append(logits[:, 0])
        try:
            step = generator.send(logits)
        except StopIteration:
            break
    for b, (sequence, target) in enumerate(zip(sequences, targets)):
        eager.reset(1)
        alone = eager.step(torch.tensor([sequence[: target + 2]]), torch.tensor([0]))[0]
        for i in range(2):
            torch.testing.assert_close(decoded[i][b], alone[target + i], atol=1e-4, rtol=0)


def test_bench_writes_json_and_a_plot(two_precision_build, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "bench",
            str(two_precision_build),
            "--batches",
            "1,2",
            "--prompt-lengths",
            "8,64",
            "--samples",
            "2",
            "--threads",
            "1",
            "--report-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    report = strict_json(tmp_path / "bench.json")
    labels = [r["label"] for r in report["runners"]]
    assert labels == ["onnxruntime/fp16", "onnxruntime/fp32", "eager (torch, fp32)"]
    for runner in report["runners"]:
        grid = {(t["kind"], t["batch"], t["tokens"]) for t in runner["timings"]}
        assert grid == {("prefill", b, n) for b in (1, 2) for n in (8, 64)} | {
            ("decode", b, c) for b in (1, 2) for c in (W // 2, W, 4 * W, 16 * W)
        }
        check_schema(runner["timings"], [TIMING])
    with Image.open(tmp_path / "bench.png") as image:
        assert image.size == (report["plot"]["width"], report["plot"]["height"]) == (1200, 450)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_engine_is_compared_with_its_onnx_by_polygraphy(tmp_path):
    from mistral_export.validate.tensorrt_compare import NAME

    build("tiny", tmp_path, "fp32")
    build("tiny", tmp_path, "fp32", backend="tensorrt")
    result = validate(tmp_path, "--precision", "fp32")
    assert result.exit_code == 0, result.output
    report = strict_json(tmp_path / "report" / "report.json")
    engine = next(a for a in report["artifacts"] if a["backend"] == "tensorrt")
    compared = next(c for c in engine["cases"] if c["name"] == NAME)
    assert compared["passed"] and any(c["metric"] == "polygraphy_compare_accuracy" for c in compared["checks"])
    assert math.isfinite(compared["metrics"]["max_abs_logit_diff"])


def test_prompt_files(tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("def f(x):\n\n    class A:\n")
    assert read_prompts(lines) == ["def f(x):", "    class A:"]
    for name, text, expected in (
        ("bad.json", "[1, 2]", "expected a JSON list of non-empty strings"),
        ("broken.json", "[", "not valid JSON"),
        ("empty.txt", "\n\n", "no prompts in it"),
    ):
        (tmp_path / name).write_text(text)
        with pytest.raises(MistralExportError, match=expected):
            read_prompts(tmp_path / name)


def test_metrics_of_known_logits():
    eager = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    artifact = eager + torch.tensor([[0.0, 1.5, 0.0], [0.0, 0.0, -0.25]])  # row 0: the argmax moves to token 1
    rows = compare_rows(artifact, eager, [7, 8], targets=torch.tensor([0, 2]))
    metrics = aggregate(rows)
    assert metrics["max_abs_logit_diff"] == pytest.approx(1.5) and metrics["rel_logit_error"] == pytest.approx(0.5)
    assert metrics["top1_agreement"] == 0.5 and rows.top1_agree == [False, True]
    p = torch.softmax(eager, -1).double()
    q = torch.softmax(artifact, -1).double()
    assert metrics["kl_max"] == pytest.approx(float((p[0] * (p[0] / q[0]).log()).sum()))
    ce = -torch.log_softmax(eager.double(), -1)[[0, 1], [0, 2]].mean()
    assert metrics["perplexity_eager"] == pytest.approx(math.exp(float(ce)))
    assert greedy_match(rows) == 0
    with_nan = aggregate(compare_rows(artifact.masked_fill(artifact == 2.75, math.nan), eager, [7, 8]))
    assert with_nan["nonfinite_logits"] == 1 and math.isnan(with_nan["max_abs_logit_diff"])
    assert not any(c["passed"] for c in checks(with_nan, "fp32", "prefill") if c["metric"] != "top1_agreement")


def test_a_cases_top1_bar_allows_for_its_sample_and_the_pooled_bar_does_not():
    def top1(agreeing: int, positions: int, kind: str) -> bool:
        metrics = {"nonfinite_logits": 0, "positions": positions, "top1_agreement": agreeing / positions}
        [bar] = [c for c in checks(metrics, "fp8", kind) if c["metric"] == "top1_agreement"]
        return bar["passed"]

    bar = THRESHOLDS["fp8"]["top1_agreement"]
    # 197 positions at 97%: one standard error is 1.2 points, so the case's bar is 93.4%.
    assert top1(190, 197, "prefill") and top1(184, 197, "prefill") and not top1(183, 197, "prefill")
    assert not top1(190, 197, "pooled") and top1(math.ceil(bar * 2017), 2017, "pooled")
    assert not top1(math.ceil(bar * 2017) - 1, 2017, "pooled")
    # The allowance shrinks with the positions: 1684 held-out positions at 95.7% fail (bar 95.75%).
    assert not top1(round(0.957 * 1684), 1684, "heldout") and top1(round(0.96 * 1684), 1684, "heldout")


def test_greedy_match_counts_ties_only_within_one_fp16_step():
    # Eager's two best logits 8.000 and 7.995 (a tie: within 2^-10 * 8), then 8.00 and 7.98 (not one).
    eager = torch.tensor([[8.0, 7.995, 0.0], [8.0, 7.98, 0.0], [8.0, 7.995, 0.0]])
    artifact = eager + torch.tensor([[0.0, 0.01, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # flips the tie
    rows = compare_rows(artifact, eager, [0, 1, 2])
    assert rows.top1_agree == [False, True, True] and rows.top1_tie == [True, False, False]
    assert greedy_match(rows) == 3 and greedy_match(rows, ties=False) == 0
    flipped_clear = compare_rows(eager + torch.tensor([[0.0] * 3, [0.0, 0.03, 0.0], [0.0] * 3]), eager, [0, 1, 2])
    assert flipped_clear.top1_tie == [False, False, False] and greedy_match(flipped_clear) == 1


def test_steps_longer_than_a_runners_limit_run_in_chunks():
    """What validate does for a TensorRT engine's longest step (its profile's max_chunk): the same logits."""
    with torch_threads(1):
        eager = EagerRunner(load_model("tiny"))
        ids = torch.randint(3, 2048, (2, 3 * W + 5), generator=torch.Generator().manual_seed(1))
        start = torch.tensor([0, 7])
        eager.reset(2)
        whole = eager.step(ids, start)
        eager.reset(2)
        torch.testing.assert_close(cases.split_step(eager, ids, start, W - 14), whole, atol=1e-4, rtol=0)
