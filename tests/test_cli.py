"""The CLI and configuration as an operator meets them: clear one-line errors, and the local mode."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kowalski.config import ROOT, ConfigError, build_config, deep_merge, env_overrides
from kowalski.instance import LocalInstance, state_path, write_instance
from kowalski.services.process import free_port

from .conftest import DATA, KOWALSKI, clean_env, run, run_cli


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
    for command in (
        "up",
        "down",
        "build",
        "test",
        "seed",
        "develop",
        "lint",
        "bench",
        "feed",
        "backfill",
    ):
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


def write_config(path: Path, settings: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"kowalski": settings}))
    return path


def test_servers_come_from_env_then_the_local_instance_then_the_config(tmp_path: Path) -> None:
    env = {"KOWALSKI__local__var_dir": str(tmp_path)}
    configured = build_config([], env)
    assert (
        configured.database.uri is None and configured.kafka.bootstrap_servers == "127.0.0.1:9092"
    )
    assert configured.origin("database").startswith("the configured server")
    local = LocalInstance(0, "mongodb://127.0.0.1:1/?directConnection=true", "127.0.0.1:2", "")
    # a live process that looks like the supervisor (`up --local` runs kowalski.py)
    with subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", "kowalski"]
    ) as pid:
        write_instance(tmp_path, dataclasses.replace(local, pid=pid.pid))
        found = build_config([], env)
        assert found.database.uri == local.mongodb_uri
        assert found.kafka.bootstrap_servers == found.kafka.bootstrap_test_servers == "127.0.0.1:2"
        assert found.origin("kafka").startswith(f"the running local instance (pid {pid.pid}")
        explicit = build_config(
            [], {**env, "MONGODB_URI": "mongodb://db:27017", "KAFKA_BOOTSTRAP_SERVERS": "k:9092"}
        )
        assert explicit.database.uri == "mongodb://db:27017"
        assert explicit.kafka.bootstrap_servers == "k:9092"
        assert (explicit.origin("database"), explicit.origin("kafka")) == (
            "MONGODB_URI",
            "KAFKA_BOOTSTRAP_SERVERS",
        )
        pid.kill()
    assert state_path(tmp_path).exists()
    assert build_config([], env).database.uri is None  # its process is gone: ignored


def assert_one_line(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0]


def test_with_nothing_running_each_command_is_one_clear_line(tmp_path: Path) -> None:
    """The README's commands after `up --local`, when it is not running: which server, why, what
    to do; never a traceback."""
    mongo_port, kafka_port = free_port(), free_port()
    config = write_config(
        tmp_path / "config.yaml",
        {
            "local": {"var_dir": str(tmp_path / "var")},
            "database": {"port": mongo_port},
            "kafka": {"bootstrap.servers": f"127.0.0.1:{kafka_port}"},
        },
    )
    env = clean_env(KOWALSKI_CONFIG=str(config))
    todo = "is `./kowalski.py up --local` running? or set "
    database = (
        f"cannot use MongoDB at mongodb://mongoadmin:***@127.0.0.1:{mongo_port}/",
        "the configured server",
        todo + "MONGODB_URI",
    )
    python = sys.executable
    vlass = str(DATA / "catalogs" / "CIRADA_VLASS1QL_table1_components_v1_head100.csv")
    for command in (
        [*KOWALSKI, "seed", "data/catalogs"],
        [
            python,
            "-m",
            "ops.catalogs",
            "ingest",
            vlass,
            "--collection",
            "V",
            "--ra",
            "RA",
            "--dec",
            "DEC",
        ],
        [python, "-m", "ops.catalogs", "synthetic", "--collection", "S", "--density", "10"],
    ):
        assert_one_line(run(*command, env=env, timeout=120), *database)
    assert_one_line(
        run(python, "-m", "ingester.replay", env=env, timeout=120),
        f"cannot use Kafka at 127.0.0.1:{kafka_port} (the configured server",
        todo + "KAFKA_BOOTSTRAP_SERVERS",
    )
    dead = f"mongodb://127.0.0.1:{mongo_port}/?directConnection=true"
    assert_one_line(
        run_cli("bench", "--rounds", "1", env={**env, "MONGODB_URI": dead}, timeout=120),
        f"cannot use MongoDB at {dead} (MONGODB_URI)",
        "Connection refused",
        "check MONGODB_URI",
    )


def test_refused_credentials_are_one_clear_line(tmp_path: Path, mongo_uri: str) -> None:
    """The configured credentials against a server that has none (the embedded one)."""
    if "127.0.0.1" not in mongo_uri:
        pytest.skip("MONGODB_URI points at an external server")
    port = int(mongo_uri.split(":")[2].split("/")[0])
    config = write_config(
        tmp_path / "config.yaml",
        {"local": {"var_dir": str(tmp_path / "var")}, "database": {"port": port}},
    )
    result = run_cli("seed", "data/catalogs", env=clean_env(KOWALSKI_CONFIG=str(config)))
    assert_one_line(result, f"127.0.0.1:{port}", "authentication failed", "or set MONGODB_URI")
