"""`package --kubernetes`: manifests that run replicas of the served repository (REPO/kubernetes/).

    deployment.json   pods running `mistral-export serve /models` (Triton + the OpenAI frontend) in the image
                      that REPO/kubernetes/Dockerfile builds: Triton's server image, mistral-export (the
                      Python-backend models import it) and this repository; one GPU per pod for the TensorRT
                      layout; readiness and liveness on Triton's /v2/health/ready and /v2/health/live; the
                      metrics port annotated for Prometheus
    service.json      HTTP, gRPC and OpenAI ports
    hpa.json          HorizontalPodAutoscaler on mistral_export_waiting_sequences per pod (see below)
    Dockerfile

Why waiting sequences: a replica serves up to its batch of sequences at once (one cache slot each), and
token throughput grows with the batch until it is full; requests waiting for a slot are the first sign
that the replicas are saturated, and they measure the missing capacity in sequences, whatever the prompt
and answer lengths (CPU or GPU utilization does not: a full batch and a half-full one both keep it busy).
The metric reaches the HPA through the Prometheus adapter (a pods metric, averaged over the pods).

Manifests are JSON (kubectl reads .json as it reads .yaml): written with the standard library, no YAML writer.
"""

from __future__ import annotations

import json
from pathlib import Path

from mistral_export.errors import MistralExportError
from mistral_export.files import write_text_atomic

FOLDER = "kubernetes"
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"  # Triton 2.51, the server version the tests run
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002, "openai": 9000}
WAITING_METRIC = "mistral_export_waiting_sequences"
MODELS_PATH = "/models"


def default_image(name: str) -> str:
    return f"mistral-export-{name.lower().replace('_', '-')}:latest"


def _labels(name: str) -> dict:
    return {"app.kubernetes.io/name": "mistral-export", "app.kubernetes.io/instance": name}


def deployment(name: str, image: str, replicas: int, gpu: bool) -> dict:
    def probe(path: str, delay: int) -> dict:
        return {
            "httpGet": {"path": path, "port": "http"},
            "initialDelaySeconds": delay,
            "periodSeconds": 10,
            "failureThreshold": 6,
        }

    resources = {"limits": {"nvidia.com/gpu": 1}} if gpu else {"requests": {"cpu": "2", "memory": "4Gi"}}
    container = {
        "name": "triton",
        "image": image,
        "command": [
            "mistral-export",
            "serve",
            MODELS_PATH,
            "--host",
            "0.0.0.0",
            *[arg for kind, port in PORTS.items() for arg in (f"--{kind}-port", str(port))],
        ],
        "ports": [{"name": kind, "containerPort": port} for kind, port in PORTS.items()],
        "readinessProbe": probe("/v2/health/ready", 10),
        "livenessProbe": probe("/v2/health/live", 30),
        "resources": resources,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": _labels(name)},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": _labels(name)},
            "template": {
                "metadata": {
                    "labels": _labels(name),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(PORTS["metrics"]),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {"containers": [container], "terminationGracePeriodSeconds": 60},
            },
        },
    }


def service(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": _labels(name)},
        "spec": {
            "selector": _labels(name),
            "ports": [{"name": kind, "port": PORTS[kind], "targetPort": kind} for kind in ("http", "grpc", "openai")],
        },
    }


def autoscaler(name: str, replicas: int, max_replicas: int, waiting_per_pod: int) -> dict:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "labels": _labels(name)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": replicas,
            "maxReplicas": max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": WAITING_METRIC},
                        "target": {"type": "AverageValue", "averageValue": str(waiting_per_pod)},
                    },
                }
            ],
        },
    }


def dockerfile(repository_name: str) -> str:
    return f"""# The image the Deployment runs: Triton's server image, mistral-export (the generate models import
# it; the OpenAI frontend is part of `mistral-export serve`) and this model repository at {MODELS_PATH}.
# Build from the repository folder:  docker build -t IMAGE -f kubernetes/Dockerfile .
FROM {TRITON_IMAGE}
COPY . {MODELS_PATH}
# A pip requirement for mistral-export: a package name, or a wheel (`pip wheel --no-deps .` in its source tree)
# copied into the repository folder: --build-arg MISTRAL_EXPORT="/models/mistral_export-...whl[deploy]"
ARG MISTRAL_EXPORT="mistral-export[deploy]"
RUN pip install --no-cache-dir "$MISTRAL_EXPORT" && rm -rf {MODELS_PATH}/{FOLDER} {MODELS_PATH}/*.whl
"""


def write_manifests(
    repository: Path,
    name: str,
    gpu: bool,
    image: str | None = None,
    replicas: int = 1,
    max_replicas: int = 4,
    waiting_per_pod: int = 1,
) -> list[Path]:
    """REPOSITORY/kubernetes/: Deployment, Service, HorizontalPodAutoscaler and the image's Dockerfile."""
    if not 1 <= replicas <= max_replicas:
        raise MistralExportError(
            f"--replicas {replicas} and --max-replicas {max_replicas}: need 1 <= replicas <= max-replicas"
        )
    resource = name.lower().replace("_", "-").replace(".", "-")  # Kubernetes names are DNS labels
    folder = Path(repository) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    documents = {
        "deployment.json": deployment(resource, image or default_image(resource), replicas, gpu),
        "service.json": service(resource),
        "hpa.json": autoscaler(resource, replicas, max_replicas, waiting_per_pod),
    }
    written = []
    for file, document in documents.items():
        write_text_atomic(folder / file, json.dumps(document, indent=2) + "\n")
        written.append(folder / file)
    write_text_atomic(folder / "Dockerfile", dockerfile(name))
    return [*written, folder / "Dockerfile"]
