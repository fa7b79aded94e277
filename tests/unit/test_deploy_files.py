"""The files we ship but cannot run here (container, Kubernetes) stay valid and agree with the code."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml

from fire_backend.cli import build_parser
from fire_backend.models import DigitsCNN
from fire_backend.models.network import Network
from fire_backend.repository.build import RepositoryOptions, write_configs
from fire_backend.repository.layout import ARTIFACTS_DIR, MODELS_DIR, ServingSettings
from fire_backend.stores.backends import STORE_URL_ENV, TLS_OPTIONS
from fire_backend.wire.names import DEFAULT_HEALTH_PORT, DEFAULT_METRICS_PORT, DEFAULT_PORTS

ROOT = Path(__file__).resolve().parents[2]
DOCKER_INSTRUCTIONS = {"FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "EXPOSE", "ENTRYPOINT", "CMD", "WORKDIR",
                       "USER", "LABEL", "VOLUME", "HEALTHCHECK", "SHELL", "STOPSIGNAL", "ONBUILD"}


def test_kubernetes_manifest_parses_and_probes_fire_serve():
    """Triton's own readiness cannot see a dead stage process: the probes ask `fire serve`'s health port."""
    docs = list(yaml.safe_load_all((ROOT / "docs/deploy/kubernetes.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PersistentVolumeClaim", "Deployment", "Service"}
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": DEFAULT_PORTS["http"], "grpc": DEFAULT_PORTS["grpc"], "metrics": DEFAULT_METRICS_PORT,
                     "health": DEFAULT_HEALTH_PORT}
    for probe, path in (("readinessProbe", "/ready"), ("startupProbe", "/ready"), ("livenessProbe", "/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": "health"}, probe
    assert all("ADMIN" not in e["name"] for e in container["env"])  # no key to hand around any more


def test_the_etcd_manifest_runs_a_quorum_with_tls_and_points_fire_at_it():
    docs = list(yaml.safe_load_all((ROOT / "docs/deploy/kubernetes-etcd.yaml").read_text()))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["Service", "Service", "StatefulSet", "PodDisruptionBudget", "NetworkPolicy", "Deployment"]
    etcd = docs[2]["spec"]
    args = etcd["template"]["spec"]["containers"][0]["args"]
    assert etcd["replicas"] == 3 and docs[3]["spec"]["minAvailable"] == 2
    assert "--client-cert-auth" in args and not any("unsafe" in a for a in args)  # fsync stays on
    patched = docs[5]["spec"]["template"]["spec"]["containers"][0]
    base = next(d for d in yaml.safe_load_all((ROOT / "docs/deploy/kubernetes.yaml").read_text())
                if d["kind"] == "Deployment")
    assert patched["name"] == base["spec"]["template"]["spec"]["containers"][0]["name"]  # the merge key matches
    env = {e["name"]: e["value"] for e in patched["env"]}
    url = urlsplit(env[STORE_URL_ENV])
    assert (url.scheme, url.hostname, url.port) == ("etcd", docs[1]["metadata"]["name"], 2379)
    assert set(parse_qs(url.query)) == set(TLS_OPTIONS) and url.path.strip("/")


def test_dockerfile_is_well_formed_and_runs_fire_serve():
    text = (ROOT / "docs/deploy/Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)
    lines = [line for line in logical.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert all(line.split()[0] in DOCKER_INSTRUCTIONS for line in lines), lines
    assert lines[0].startswith("FROM nvcr.io/nvidia/tritonserver:24.10")
    (entrypoint,) = [json.loads(line.split(None, 1)[1]) for line in lines if line.startswith("ENTRYPOINT")]
    assert entrypoint[:4] == ["fire", "serve", "--repository", "/repository"]
    args = build_parser().parse_args(entrypoint[1:])
    assert args.health_port == DEFAULT_HEALTH_PORT and args.http_inference  # on, through the front


def test_committed_model_repository_is_what_the_builder_writes(tmp_path):
    """model_repository/ is the digits demo's generated repository; regenerate it if this fails."""
    shapes = {layer.name: layer.shape for layer in Network.from_module(DigitsCNN(), (1, 8, 8)).candidates()}
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
