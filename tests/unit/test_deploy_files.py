"""The files we ship but cannot run here (container, Kubernetes) stay valid and agree with the code."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from fire_backend.models import DigitsCNN
from fire_backend.serving.artifacts import ARTIFACTS_DIR, MODELS_DIR, ServingSettings
from fire_backend.serving.repository import RepositoryOptions, write_configs
from fire_backend.split import candidate_layers

ROOT = Path(__file__).resolve().parents[2]
DOCKER_INSTRUCTIONS = {"FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "EXPOSE", "ENTRYPOINT", "CMD", "WORKDIR",
                       "USER", "LABEL", "VOLUME", "HEALTHCHECK", "SHELL", "STOPSIGNAL", "ONBUILD"}


def test_kubernetes_manifest_parses_and_probes_triton():
    docs = list(yaml.safe_load_all((ROOT / "docs/deploy/kubernetes.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PersistentVolumeClaim", "Deployment", "Service"}
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {p["containerPort"] for p in container["ports"]} == {8000, 8001, 8002}


def test_dockerfile_is_well_formed_and_serves_the_models_folder_in_poll_mode():
    text = (ROOT / "docs/deploy/Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)
    lines = [line for line in logical.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert all(line.split()[0] in DOCKER_INSTRUCTIONS for line in lines), lines
    assert lines[0].startswith("FROM nvcr.io/nvidia/tritonserver:24.10")
    assert f"--model-repository=/repository/{MODELS_DIR}" in logical
    assert "--model-control-mode=poll" in logical and "--load-model" not in logical


def test_committed_model_repository_is_what_the_builder_writes(tmp_path):
    """model_repository/ is the digits demo's generated repository; regenerate it if this fails."""
    shapes = dict(candidate_layers(DigitsCNN(), (1, 8, 8)))
    settings = ServingSettings(layer="block2", input_shape=(1, 8, 8), latent_shape=shapes["block2"],
                               num_classes=10, arch="digits_cnn")
    write_configs(tmp_path, settings, RepositoryOptions())
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(ROOT / "model_repository") for p in (ROOT / "model_repository").rglob("*")
                       if p.is_file() and ARTIFACTS_DIR not in p.parts and "__pycache__" not in p.parts)
    assert generated and all(rel.parts[0] == MODELS_DIR for rel in generated)
    assert generated == committed
    for rel in generated:
        assert (tmp_path / rel).read_text() == (ROOT / "model_repository" / rel).read_text(), rel
