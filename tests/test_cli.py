"""The CLI and configuration as an operator meets them: clear one-line errors, and the local mode."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from penquins import Kowalski

from kowalski.config import ROOT, ConfigError, build_config, deep_merge, env_overrides
from kowalski.services._process import free_port

KOWALSKI = [sys.executable, str(ROOT / "kowalski.py")]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KOWALSKI, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


def clean_env(**extra: str) -> dict[str, str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KOWALSKI", "MONGODB_URI", "KAFKA_BOOTSTRAP"))
    }
    return {**base, **extra}


def test_defaults_validate_and_merge(tmp_path: Path) -> None:
    cfg = build_config([])
    assert cfg.server.port == 4000 and cfg.database.collections["alerts_ztf"] == "ZTF_alerts"
    assert [next(iter(stage)) for stage in cfg.database.filters["ZTF_alerts"]] == [
        "$match",
        "$project",
        "$lookup",
        "$project",
    ]
    override = tmp_path / "config.yaml"
    override.write_text(
        "kowalski:\n  server:\n    port: 4100\n  database:\n    collections:\n      tns: TNS_v2\n"
    )
    merged = build_config([override], {})
    assert merged.server.port == 4100 and merged.database.collections["tns"] == "TNS_v2"
    assert merged.database.collections["alerts_ztf"] == "ZTF_alerts"  # deep merge keeps siblings
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


def test_environment_overrides() -> None:
    env = {
        "MONGODB_URI": "mongodb://db:27017",
        "KAFKA_BOOTSTRAP_SERVERS": "k:9092",
        "KOWALSKI__ingester__batch_size": "8",
    }
    cfg = build_config([], env)
    assert cfg.database.uri == "mongodb://db:27017"
    assert cfg.kafka.bootstrap_servers == cfg.kafka.bootstrap_test_servers == "k:9092"
    assert cfg.ingester.batch_size == 8
    assert env_overrides({"KOWALSKI__misc__broker": "true"}) == {"misc": {"broker": True}}


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (
            "kowalski:\n  server:\n    port: lots\n",
            "config error: kowalski.server.port: Input should be a valid integer",
        ),
        (
            "kowalski:\n  server:\n    prot: 4000\n",
            "config error: unknown key kowalski.server.prot",
        ),
        ("kowalski:\n  ml:\n    backend: pytorch\n", "config error: kowalski.ml.backend"),
        ("kowalski: [1, 2]\n", "expected a mapping under the root key 'kowalski'"),
        ("kowalski:\n  server: {port: [\n", "not valid YAML"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path: Path, yaml_text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        build_config([path], {})
    assert message in str(err.value) and "\n" not in str(err.value)
    # and the CLI refuses to start with exactly that line
    result = run_cli("up", "--local", env=clean_env(KOWALSKI_CONFIG=str(path)), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in result.stderr


def test_cli_help_and_missing_docker() -> None:
    for command in ("up", "down", "build", "test", "seed", "develop", "lint", "bench"):
        result = run_cli(command, "--help", env=clean_env())
        assert result.returncode == 0 and "usage: kowalski.py" in result.stdout
    env = clean_env(PATH="/nonexistent")
    result = subprocess.run([*KOWALSKI, "down"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 1 and "docker not found on PATH" in result.stderr
    assert "up --local" in result.stderr


def test_missing_service_is_one_clear_line(tmp_path: Path) -> None:
    dead = f"mongodb://127.0.0.1:{free_port()}/?directConnection=true"
    result = run_cli(
        "up",
        "--local",
        env=clean_env(MONGODB_URI=dead, KOWALSKI__local__var_dir=str(tmp_path)),
        timeout=120,
    )
    assert result.returncode == 1 and f"error: MongoDB is not reachable at {dead}" in result.stderr


def test_port_in_use_is_one_clear_line(tmp_path: Path, mongo_uri: str) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        env = clean_env(
            MONGODB_URI=mongo_uri,
            KOWALSKI__local__var_dir=str(tmp_path),
            KOWALSKI__server__port=str(port),
            KOWALSKI__server__host="127.0.0.1",
            KAFKA_BOOTSTRAP_SERVERS="",
            KOWALSKI__database__db="portcheck",
        )
        result = run_cli("up", "--local", "--no-replay", env=env, timeout=120)
    assert result.returncode == 1
    assert f"cannot start the API: port {port} on 127.0.0.1 is already in use" in result.stderr


# alerts per collection after `up --local` replays the bundled packets (LSST: 15 Confluent-framed
# messages, 14 distinct diaSources)
EXPECTED_LOCAL = {
    "ZTF_alerts": 38,
    "PGIR_alerts": 17,
    "WNTR_alerts": 11,
    "TURBO_alerts": 11,
    "LSST_alerts": 14,
    "DECAM_alerts": 1,
}


def test_up_local_ingests_the_bundled_night_and_serves_it(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """The README's first command, detached, on free ports: API answers, the night is ingested."""
    api_port = free_port()
    env = clean_env(
        KOWALSKI__local__var_dir=str(tmp_path / "var"),
        KOWALSKI__local__mongo_port=str(free_port()),
        KOWALSKI__local__kafka_port=str(free_port()),
        KOWALSKI__local__kafka_controller_port=str(free_port()),
        KOWALSKI__server__port=str(api_port),
        KOWALSKI__server__processes="1",
        KOWALSKI__dask__n_workers="1",
        KOWALSKI__dask__dashboard_address="null",
        KOWALSKI__kafka__group=f"local-{api_port}",
    )
    env["KAFKA_BOOTSTRAP_SERVERS"] = kafka_bootstrap  # reuse the session broker (saves a JVM)
    up = run_cli("up", "--local", "--detach", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        counts: dict[str, int] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            # a new client each time: penquins caches the catalog list when it connects
            k = Kowalski(
                username="admin", password="admin", protocol="http", host="127.0.0.1", port=api_port
            )
            assert k.ping()
            names = k.instances["default"]["catalogs"]
            counts = {
                c: k.query(
                    {"query_type": "count_documents", "query": {"catalog": c, "filter": {}}}
                )["default"].get("data", 0)
                for c in EXPECTED_LOCAL
                if c in names
            }
            if counts == EXPECTED_LOCAL:
                break
            time.sleep(1)
        assert counts == EXPECTED_LOCAL
    finally:
        down = run_cli("down", "--local", env=env)
    assert down.returncode == 0 and "stopped" in down.stdout
