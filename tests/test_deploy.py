"""Container files, validated statically: no Docker engine runs on these machines."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from kowalski.config import ROOT, ConfigError, build_config, check_database_password

from .conftest import clean_env, run

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


# published only on 127.0.0.1, if at all: MongoDB, Kafka, the dask scheduler and dashboards
INTERNAL_PORTS = {27017, 9092, 9093, 8786, 8787, 8788}
CREDENTIAL = re.compile(r"PASSWORD|SECRET|TOKEN|KEY", re.IGNORECASE)
VARIABLE = re.compile(r"\$\{(\w+)(:?[-?])?([^}]*)\}")
VARIABLE_REQUIRED = re.compile(r"\$\{(\w+):\?")


def published(port: str | int) -> tuple[str, int]:
    """(host address, container port) of a `ports:` entry (short syntax)."""
    parts = str(port).split(":")
    host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"
    return host_ip, int(parts[-1].split("/")[0])


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_publishes_databases_and_dask_on_loopback_only(name: str) -> None:
    for svc_name, svc in compose(name)["services"].items():
        for port in svc.get("ports", []):
            host_ip, container_port = published(port)
            if container_port in INTERNAL_PORTS:
                assert host_ip == "127.0.0.1", f"{name}: {svc_name} publishes {port}"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_has_no_default_credentials(name: str) -> None:
    text = (ROOT / name).read_text()
    assert "mongoadminsecret" not in text
    for variable, operator, default in VARIABLE.findall(text):
        if CREDENTIAL.search(variable):
            # required (`:?message`), or empty when unset (the program refuses what is missing)
            assert operator == ":?" or (operator == ":-" and default == ""), f"{name}: {variable}"
    services = compose(name)["services"]
    assert (
        "${MONGO_INITDB_ROOT_PASSWORD:?"
        in services["mongo"]["environment"]["MONGO_INITDB_ROOT_PASSWORD"]
    )
    assert "${MONGO_INITDB_ROOT_PASSWORD:?" in services["ingester"]["environment"]["MONGODB_URI"]
    mongo_check = " ".join(services["mongo"]["healthcheck"]["test"])
    assert "$$MONGO_INITDB_ROOT_PASSWORD" in mongo_check  # the container's own, not a literal


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_dask_scheduler_and_scalable_workers(name: str) -> None:
    services = compose(name)["services"]
    scheduler, worker, ingester = (
        services[s] for s in ("dask-scheduler", "dask-worker", "ingester")
    )
    # the workers run the pipeline: the ingester's image (its code and models)
    for svc in (scheduler, worker):
        assert svc["image"] == ingester["image"] and svc["build"] == ingester["build"]
        assert svc["healthcheck"]["test"], "the image's check is the ingester's consumer group"
    assert scheduler["command"][:2] == ["dask", "scheduler"]
    assert "--port" in scheduler["command"] and "8786" in scheduler["command"]
    assert worker["command"][:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    # `--scale dask-worker=N`: no fixed name, no published port
    assert "container_name" not in worker and "ports" not in worker
    assert ingester["environment"]["KOWALSKI__dask__scheduler_address"] == "dask-scheduler:8786"
    assert "dask-scheduler" in ingester["depends_on"] and "dask-scheduler" in worker["depends_on"]
    assert worker["environment"]["MONGODB_URI"] == ingester["environment"]["MONGODB_URI"]


def deployment_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Deployment with Docker")
    return readme[start : readme.index("\n## ", start + 1)]


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_every_compose_variable_is_documented(name: str) -> None:
    section = deployment_section()
    for variable, _, _ in VARIABLE.findall((ROOT / name).read_text()):
        assert f"`{variable}`" in section, f"{name}: ${{{variable}}} is not in the README"


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
    module = re.search(r'^CMD \["python", "-m", "(\w+)"\]', text, re.MULTILINE)
    assert module and (ROOT / module.group(1) / "__main__.py").exists()


def test_requirements_are_pinned() -> None:
    for path in Path(ROOT / "requirements").glob("*.txt"):
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "-r")):
                assert "==" in line, f"{path.name}: {line} is not pinned"


# ---------------------------------------------------------------- database credentials

REMOTE_DEFAULT = (
    "mongodb://mongoadmin:mongoadminsecret@mongo:27017/?authSource=admin&replicaSet=rs0"
)


def db_environ(**extra: str) -> dict[str, str]:
    return clean_env(
        KOWALSKI_JWT_SECRET_KEY="jwt-" + "x" * 40, KOWALSKI_ADMIN_PASSWORD="pw", **extra
    )


@pytest.mark.parametrize(
    "settings",
    [
        {"MONGODB_URI": REMOTE_DEFAULT},
        {"MONGODB_URI": "mongodb://mongo-0.example.org:27017,mongo-1.example.org:27017/"},
        {"MONGODB_URI": "mongodb://mongoadmin:@10.0.0.5/?authSource=admin"},
        {"KOWALSKI__database__host": "mongo"},  # host + the default admin_password
    ],
)
def test_default_or_empty_database_password_is_refused_outside_local_mode(
    settings: dict[str, str],
) -> None:
    cfg = build_config([], db_environ(**settings))
    with pytest.raises(ConfigError, match=r"refusing to use the database at .* password"):
        check_database_password(cfg)


@pytest.mark.parametrize(
    "settings",
    [
        {},  # database.host 127.0.0.1: a developer's own mongod
        {"MONGODB_URI": "mongodb://127.0.0.1:27017/?directConnection=true"},  # the embedded server
        {"MONGODB_URI": "mongodb://[::1]:27017/"},
        {"MONGODB_URI": "mongodb://localhost/"},
        {"MONGODB_URI": "mongodb://mongoadmin:s%40fe-and-long@mongo:27017/?replicaSet=rs0"},
        {"MONGODB_URI": "mongodb://mongo.example.org/?authMechanism=MONGODB-X509&tls=true"},
        {"MONGODB_URI": REMOTE_DEFAULT, "KOWALSKI__server__insecure_dev": "true"},
        {"KOWALSKI__database__host": "mongo", "KOWALSKI__database__admin_password": "s3cret-x"},
    ],
)
def test_database_password_accepted(settings: dict[str, str]) -> None:
    check_database_password(build_config([], db_environ(**settings)))


@pytest.mark.parametrize("module", ["api", "ingester"])
def test_entry_points_refuse_the_default_database_password_in_one_line(module: str) -> None:
    result = run(sys.executable, "-m", module, env=db_environ(MONGODB_URI=REMOTE_DEFAULT))
    assert result.returncode == 1
    assert result.stderr.startswith("error: refusing to use the database at mongo:27017 with ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_retired_upstream_keys_are_named(tmp_path: Path) -> None:
    user = tmp_path / "config.yaml"
    user.write_text("kowalski:\n  kafka:\n    processes_per_topic: {ZTF: 1}\n")
    with pytest.raises(ConfigError, match=r"kafka\.processes_per_topic \(an upstream setting"):
        build_config([user], clean_env())


def cli_module() -> ModuleType:
    """kowalski.py, loaded under another name (the package `kowalski` owns that one)."""
    spec = importlib.util.spec_from_file_location("kowalski_cli", ROOT / "kowalski.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_up_writes_random_compose_secrets_once(tmp_path: Path) -> None:
    cli, env_file = cli_module(), tmp_path / ".env"
    cli.ensure_env_file(env_file)
    values = dict(
        line.split("=", 1) for line in env_file.read_text().splitlines() if not line.startswith("#")
    )
    assert set(values) == set(cli.COMPOSE_SECRETS)
    required = set(VARIABLE_REQUIRED.findall((ROOT / COMPOSE_FILES[0]).read_text()))
    assert required <= set(values)  # compose starts with this .env alone
    assert all(re.fullmatch(r"[0-9a-f]{48}", v) for v in values.values())  # URL-safe
    assert env_file.stat().st_mode & 0o077 == 0
    before = env_file.read_text()
    cli.ensure_env_file(env_file)
    assert env_file.read_text() == before
    assert ".env" in (ROOT / ".dockerignore").read_text().split()
