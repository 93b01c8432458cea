"""The README's walkthrough and the commands after `up --local`, against one running local instance
(free ports, a var directory of its own, the session's Kafka broker). After `up`, no command gets
MONGODB_URI or KAFKA_BOOTSTRAP_SERVERS: they find the instance by themselves."""

from __future__ import annotations

import ast
import json
import re
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from penquins import Kowalski
from pymongo import MongoClient

from kowalski.config import ROOT
from kowalski.instance import LocalInstance, read_instance, state_path
from kowalski.services.process import free_port

from .conftest import DATA, KOWALSKI, clean_env, run, run_cli

pytestmark = pytest.mark.timeout(900)  # starting the instance, seeding and the bench take minutes
README = ROOT / "README.md"
# alerts per collection after `up --local` replays the bundled packets (LSST: 15 Confluent-framed
# messages, 14 distinct diaSources)
BUNDLED_NIGHT = {
    "ZTF_alerts": 38,
    "PGIR_alerts": 17,
    "WNTR_alerts": 11,
    "TURBO_alerts": 11,
    "LSST_alerts": 14,
    "DECAM_alerts": 1,
}


@dataclass
class Walkthrough:
    """The README's walkthrough: shell commands, the penquins snippet, its printed answer."""

    start: list[list[str]]
    then: list[list[str]]
    query: str
    answer: Any
    stop: list[list[str]]


def commands(block: str) -> list[list[str]]:
    lines = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [
        KOWALSKI + words[1:] if words[0] == "./kowalski.py" else words for words in lines if words
    ]


def readme_walkthrough() -> Walkthrough:
    section = README.read_text().split("### Walkthrough", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, re.S)
    assert [kind for kind, _ in blocks[:3]] == ["bash", "python", "bash"]
    (_, first), (_, snippet), (_, last) = blocks[:3]
    shell = commands(first)
    assert shell[0][len(KOWALSKI) :] == ["up", "--local", "--detach"]
    code, printed = snippet.split("\n# ", 1)
    answer = ast.literal_eval(" ".join(line.lstrip("# ") for line in ("# " + printed).splitlines()))
    return Walkthrough(shell[:1], shell[1:], code, answer, commands(last))


def evaluate(snippet: str, port: int) -> Any:
    """Run the README's python block (on this instance's port); the value of its last line."""
    tree = ast.parse(snippet.replace("port=4000", f"port={port}"))
    *body, last = tree.body
    assert isinstance(last, ast.Expr)
    scope: dict[str, Any] = {}
    exec(compile(ast.Module(body, []), "README.md", "exec"), scope)
    return eval(compile(ast.Expression(last.value), "README.md", "eval"), scope)


@dataclass
class Local:
    env: dict[str, str]  # KOWALSKI_CONFIG only: no database or Kafka address
    port: int
    state: LocalInstance
    var: Path


@pytest.fixture(scope="module")
def walkthrough() -> Walkthrough:
    return readme_walkthrough()


@pytest.fixture(scope="module")
def local(
    walkthrough: Walkthrough, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Local]:
    """The walkthrough's first command, on free ports (a config.yaml of its own) and the
    session's broker (saves a JVM); its last command at the end."""
    home = tmp_path_factory.mktemp("local")
    port = free_port()
    anchored = {"ZTF": "^ztf_[0-9]{8}_programid[123]$", "PGIR": "^pgir_[0-9]{8}$"}
    anchored |= {"WNTR": "^winter_[0-9]{8}$", "TURBO": "^turbo_[0-9]{8}$"}
    anchored |= {"LSST": "^lsst-alerts-v[0-9]+$", "DECAM": "^decam_[0-9]{8}$"}
    settings = {
        "server": {"port": port, "processes": 1},
        "local": {
            "var_dir": str(home / "var"),
            "mongo_port": free_port(),
            "kafka_port": free_port(),
            "kafka_controller_port": free_port(),
        },
        "dask": {"n_workers": 1, "dashboard_address": None},
        "ingester": {"metrics_port": free_port()},
        # only the bundled night's topics (other tests produce to suffixed ones)
        "kafka": {"group": f"local-{port}", "topics": anchored},
    }
    config = home / "config.yaml"
    config.write_text(yaml.safe_dump({"kowalski": settings}))
    env = clean_env(KOWALSKI_CONFIG=str(config))
    [up] = walkthrough.start
    started = run(*up, env={**env, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap})
    assert started.returncode == 0, started.stdout + started.stderr
    state = read_instance(home / "var")
    assert state is not None and state.kafka_bootstrap_servers == kafka_bootstrap
    try:
        yield Local(env, port, state, home / "var")
    finally:
        for command in walkthrough.stop:
            stopped = run(*command, env=env)
            assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
        assert not state_path(home / "var").exists()


def poll(what: Any, want: Any, timeout: float = 240) -> Any:
    """`what()` until it equals `want` (ingestion is asynchronous), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    got = what()
    while got != want and time.monotonic() < deadline:
        time.sleep(1)
        got = what()
    return got


def test_readme_walkthrough_word_for_word(walkthrough: Walkthrough, local: Local) -> None:
    for command in walkthrough.then:
        result = run(*command, env=local.env, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        if "seed" in command:
            assert "-> VLASS_DR1: read 27, ingested 27 (27 new), rejected 0" in result.stdout
    assert poll(lambda: evaluate(walkthrough.query, local.port), walkthrough.answer) == (
        walkthrough.answer
    )


def test_up_local_ingests_the_bundled_night_and_serves_it(local: Local) -> None:
    def counts() -> dict[str, int]:
        # a new client each time: penquins caches the catalog list when it connects
        k = Kowalski(
            username="admin", password="admin", protocol="http", host="127.0.0.1", port=local.port
        )
        names = k.instances["default"]["catalogs"]
        return {
            c: k.query({"query_type": "count_documents", "query": {"catalog": c, "filter": {}}})[
                "default"
            ].get("data", 0)
            for c in BUNDLED_NIGHT
            if c in names
        }

    assert poll(counts, BUNDLED_NIGHT) == BUNDLED_NIGHT


def test_status_shows_the_local_instance(local: Local) -> None:
    """`./kowalski.py status` reads both endpoints `up --local` serves (the ingester's on its
    metrics port, the API's readiness) and prints the live figures. `up` returns once the
    ingester's endpoint answers, so the first `status` after it already reaches the ingester; the
    figures then move as the replayed alerts are ingested."""
    first = run(sys.executable, "kowalski.py", "status", env=local.env)
    assert "ingester: NOT ANSWERING" not in first.stdout, first.stdout + first.stderr
    assert "API: ready" in first.stdout, first.stdout + first.stderr

    def screen() -> tuple[int, str, float]:
        result = run(sys.executable, "kowalski.py", "status", env=local.env)
        rows = [line.split() for line in result.stdout.splitlines() if line.startswith("ZTF ")]
        return result.returncode, result.stdout + result.stderr, float(rows[0][3]) if rows else 0.0

    code, text, archived = screen()
    deadline = time.monotonic() + 240
    while (code != 0 or archived == 0) and time.monotonic() < deadline:
        time.sleep(1)
        code, text, archived = screen()
    assert code == 0 and archived > 0, text
    assert "API: ready" in text and "ingester: ready" in text, text
    assert "Kafka lag:" in text and "dask workers alive: 1" in text, text
    header = next(line for line in text.splitlines() if line.startswith("survey"))
    assert "duplicates" in header, text


def test_catalog_commands_use_the_local_instance(local: Local) -> None:
    vlass = DATA / "catalogs" / "CIRADA_VLASS1QL_table1_components_v1_head100.csv"
    python = [sys.executable, "-m", "ops.catalogs"]
    ingest = [*python, "ingest", str(vlass), "--collection", "VLASS_cli", "--ra", "RA"]
    ingest += ["--dec", "DEC", "--id", "Component_name"]
    synthetic = [*python, "synthetic", "--collection", "synthetic_cli", "--density", "100"]
    synthetic += ["--center", "10", "20", "--radius", "0.5"]
    for command in (ingest, synthetic):
        result = run(*command, env=local.env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert " read " in result.stdout and ", rejected 0" in result.stdout
    with MongoClient[dict[str, Any]](local.state.mongodb_uri) as client:
        db = client["kowalski"]
        assert db.VLASS_cli.count_documents({}) == pd.read_csv(vlass).Component_name.nunique()
        assert db.synthetic_cli.count_documents({"synthetic": True}) > 50


def test_replay_produces_to_the_local_kafka(local: Local) -> None:
    result = run(sys.executable, "-m", "ingester.replay", "data/ztf_alerts/20200202", env=local.env)
    assert result.returncode == 0, result.stderr
    expected = f"replayed 12 alerts to 2 topics at {local.state.kafka_bootstrap_servers}"
    assert expected in result.stdout


def test_bench_quickest_mode_uses_the_local_instance(local: Local, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # the quickest mode: the micro benchmarks, one round (the default is the night benchmark)
    result = run_cli(
        "bench", "--micro", "--rounds", "1", "--out", str(out), env=local.env, timeout=900
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    database = json.loads(out.read_text())["machine"]["database"]
    assert database.startswith(f"the running local instance (pid {local.state.pid}")


def test_a_second_up_local_refuses_to_start(local: Local) -> None:
    result = run_cli("up", "--local", env=local.env, timeout=120)
    assert result.returncode == 1
    assert f"a local Kowalski is already running (pid {local.state.pid}" in result.stderr
