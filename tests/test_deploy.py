"""Container files, validated statically: no Docker engine runs on these machines."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kowalski.config import ROOT

COMPOSE_FILES = [
    "docker-compose.defaults.yaml",
    "docker-compose.fritz.defaults.yaml",
    "docker-compose.traefik.defaults.yaml",
]
DOCKERFILES = ["Dockerfile.api", "Dockerfile.ingester"]


def compose(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / name).read_text())
    return data


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_services_volumes_healthchecks(name: str) -> None:
    doc = compose(name)
    services = doc["services"]
    assert {"mongo", "kafka", "api", "ingester"} <= set(services)
    assert services["mongo"]["image"].startswith("mongo:7")
    assert "--replSet rs0" in " ".join(services["mongo"]["entrypoint"])
    assert "--keyFile" in " ".join(services["mongo"]["entrypoint"])
    assert services["kafka"]["image"].startswith("apache/kafka:4")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    for svc in ("mongo", "kafka"):
        assert services[svc]["healthcheck"]["test"], svc
    declared = set(doc.get("volumes", {}))
    for svc_name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(("./", "/")):
                continue
            assert source in declared, f"{svc_name} uses undeclared volume {source}"
        for net in svc.get("networks", []):
            assert net in doc["networks"], f"{svc_name} uses undeclared network {net}"
        for dep in svc.get("depends_on", {}):
            assert dep in services
            assert "healthcheck" in services[dep], (
                f"{svc_name} waits for {dep}, which has no healthcheck"
            )
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).exists()
    for secret in doc.get("secrets", {}).values():
        assert secret["file"] == "./mongo_key.yaml"  # written by kowalski.py up/build
    env = services["api"]["environment"]
    assert "replicaSet=rs0" in env["MONGODB_URI"] and env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"


def test_fritz_variant_joins_external_network() -> None:
    doc = compose("docker-compose.fritz.defaults.yaml")
    assert doc["networks"]["fritz_net"]["external"] is True
    assert "fritz_net" in doc["services"]["api"]["networks"]


def test_traefik_variant_tls_and_redirect() -> None:
    doc = compose("docker-compose.traefik.defaults.yaml")
    traefik = doc["services"]["traefik"]
    assert traefik["image"].startswith("traefik:v3")
    command = " ".join(traefik["command"])
    assert "acme.httpchallenge=true" in command and "websecure.address=:443" in command
    labels = doc["services"]["api"]["labels"]
    assert "traefik.http.routers.kowalski.tls.certresolver=myhttpchallenge" in labels
    assert any("redirectscheme.scheme=https" in label for label in labels)
    assert "ports" not in doc["services"]["api"]  # only reachable through traefik
    assert "letsencrypt" in doc["volumes"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_reference_existing_files(name: str) -> None:
    text = (ROOT / name).read_text()
    sources: list[str] = []
    for line in text.splitlines():
        match = re.match(r"^COPY\s+(?!--)(.+)\s+\S+$", line.strip())
        if match:
            sources += match.group(1).split()
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist"
    for req in re.findall(r"pip install -r (\S+)", text):
        assert (ROOT / req).exists()
    module = re.search(r'CMD \["python", "-m", "(\w+)"\]', text)
    assert module and (ROOT / module.group(1) / "__main__.py").exists()


def test_requirements_are_pinned() -> None:
    for path in Path(ROOT / "requirements").glob("*.txt"):
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "-r")):
                assert "==" in line, f"{path.name}: {line} is not pinned"
