"""`package --kubernetes`: the manifests validate offline against the Kubernetes schemas (kubernetes-validate,
strict: unknown fields are errors), and say what the issue asks (probes, GPU, ports, the autoscaler's metric)."""

import json

import pytest
from typer.testing import CliRunner

from mistral_export.cli import app
from mistral_export.deploy.kubernetes import PORTS, WAITING_METRIC, write_manifests

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the dev extra (kubernetes-validate) is absent")
# An older release (autoscaling/v2 is GA since 1.23) and the newest whose schemas the package ships.
VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]


def validate_all(folder):
    documents = {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    assert set(documents) == {"deployment.json", "service.json", "hpa.json"}
    for version in VERSIONS:
        for document in documents.values():
            kubernetes_validate.validate(document, version, strict=True)
    return documents


def test_package_kubernetes_writes_manifests_that_validate(tiny_build, tmp_path):
    repository = tmp_path / "repo"
    result = CliRunner().invoke(
        app,
        [
            "package",
            str(tiny_build),
            "-o",
            str(repository),
            "--name",
            "tiny",
            "--kubernetes",
            "--image",
            "registry.example/tiny:1",
            "--replicas",
            "2",
            "--max-replicas",
            "6",
        ],
    )
    assert result.exit_code == 0, result.output
    documents = validate_all(repository / "kubernetes")
    pod = documents["deployment.json"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == "registry.example/tiny:1" and documents["deployment.json"]["spec"]["replicas"] == 2
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "nvidia.com/gpu" not in json.dumps(container)  # the ONNX Runtime layout runs on CPU
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(PORTS["metrics"])
    service_ports = {p["port"] for p in documents["service.json"]["spec"]["ports"]}
    assert service_ports == {PORTS[k] for k in ("http", "grpc", "openai")}
    hpa = documents["hpa.json"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == WAITING_METRIC  # on the served endpoint: test_openai_api
    assert (repository / "kubernetes" / "Dockerfile").read_text().startswith("# The image")


def test_tensorrt_layout_asks_for_a_gpu_and_strict_validation_bites(tmp_path):
    write_manifests(tmp_path, "mistral_7b", gpu=True)
    documents = validate_all(tmp_path / "kubernetes")
    assert documents["deployment.json"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "nvidia.com/gpu": 1
    }
    assert documents["deployment.json"]["metadata"]["name"] == "mistral-7b"  # a DNS label
    documents["deployment.json"]["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(documents["deployment.json"], VERSIONS[0], strict=True)


def test_bad_replica_counts_are_refused(tiny_build, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "package",
            str(tiny_build),
            "-o",
            str(tmp_path / "repo"),
            "--kubernetes",
            "--replicas",
            "5",
            "--max-replicas",
            "2",
        ],
    )
    assert result.exit_code == 2 and "error: --replicas 5 and --max-replicas 2" in result.output
