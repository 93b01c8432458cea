"""Session fixtures: real servers on 127.0.0.1, started by the project's own modules.

- MongoDB wire: MONGODB_URI if set (e.g. a real mongod), else an embedded SecantusDB in a temp dir.
- Kafka: KAFKA_BOOTSTRAP_SERVERS if set, else a local KRaft broker (jars from Maven Central).
Nothing here mocks either server.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from kowalski.config import ROOT, Config, build_config
from kowalski.services.kafka import LocalKafka
from kowalski.services.mongo import EmbeddedMongo
from kowalski.services.process import free_port

KOWALSKI = [sys.executable, str(ROOT / "kowalski.py")]
DATA = ROOT / "data"
ZTF_ALERTS = DATA / "ztf_alerts"
OTHER_ALERTS = DATA / "other_alerts"


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("MONGODB_URI")
    if external:
        yield external
        return
    server = EmbeddedMongo(tmp_path_factory.mktemp("mongo") / "db", free_port()).start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    broker = LocalKafka.on_free_ports(tmp_path_factory.mktemp("kafka")).start()
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def test_db_name() -> str:
    """A database of its own per test session, so a real mongod is never clobbered."""
    return f"kowalski_test_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def test_environ(
    mongo_uri: str, test_db_name: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The environment of the tests' configurations: the session database, and a var directory
    of its own, so a developer's running `up --local` instance (var/) is never picked up."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("KOWALSKI")},
        "MONGODB_URI": mongo_uri,
        "KOWALSKI__database__db": test_db_name,
        "KOWALSKI__local__var_dir": str(tmp_path_factory.mktemp("var")),
        "KOWALSKI_JWT_SECRET_KEY": "test-" + uuid.uuid4().hex,
        "KOWALSKI__server__insecure_dev": "true",  # tests log in as admin/admin
        # ingesters started by tests serve no metrics endpoint (several run at once, and a
        # developer's instance may hold 9309); tests/test_metrics.py sets a free port
        "KOWALSKI__ingester__metrics_port": "0",
    }


@pytest.fixture(scope="session")
def cfg(test_environ: dict[str, str]) -> Config:
    return build_config([], test_environ)


@pytest.fixture
async def mongo(cfg: Config, mongo_uri: str) -> AsyncIterator[AsyncMongoClient[dict[str, Any]]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    try:
        yield client
    finally:
        await client.close()


def ztf_alert_files() -> list[Path]:
    return sorted(ZTF_ALERTS.rglob("*.avro"))


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`./kowalski.py ARGS` as a user runs it, in the repository root."""
    return run(*KOWALSKI, *args, env=env, timeout=timeout)


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any Kowalski, database or Kafka setting, plus `extra`."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KOWALSKI", "MONGODB_URI", "KAFKA_BOOTSTRAP"))
    }
    return {**base, **extra}


class DestroyedTasks(logging.Handler):
    """Records asyncio's `Task was destroyed but it is pending!`: a task garbage-collected while
    pending, e.g. a background task of a database client left open when its loop went away."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Task was destroyed but it is pending"):
            self.messages.append(message)


DESTROYED_TASKS = DestroyedTasks()


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("asyncio").addHandler(DESTROYED_TASKS)


# What a leaked async client leaves behind shows up when it is garbage-collected: collected after
# each test (and after each module's fixtures), it fails the test that leaked it, through
# pytest's unraisable exceptions (errors by pyproject.toml) and the destroyed tasks (below).
@pytest.fixture(autouse=True)
def collect_test_garbage() -> Iterator[None]:
    yield
    gc.collect()


@pytest.fixture(autouse=True, scope="module")
def collect_module_garbage() -> Iterator[None]:
    yield
    gc.collect()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None]:
    """A test during which asyncio destroyed a pending task fails, after pytest has reported the
    unraisable exceptions that usually come with it."""
    try:
        yield
    finally:
        destroyed, DESTROYED_TASKS.messages = DESTROYED_TASKS.messages, []
    assert destroyed == [], "\n".join(destroyed)


# what a leaked async client (or a loop closed under it) prints in a process's output
LEAK_MESSAGES = (
    "Task was destroyed but it is pending",
    "was never awaited",
    "There is no current event loop",
)


def leak_messages(output: str) -> list[str]:
    """The lines of a subprocess's output that tell of a leaked async client."""
    return [line for line in output.splitlines() if any(m in line for m in LEAK_MESSAGES)]


def found(doc: dict[str, Any] | None) -> dict[str, Any]:
    """A document a test expects to be there (find_one's None fails the test here)."""
    assert doc is not None, "document not found"
    return doc


# ------------------------------------------------------------------ the API, in-process
# (tests/apiclient.py; modules that need gunicorn bind apiclient.gunicorn_api/gunicorn_users)


@pytest.fixture(scope="module")
def api_cfg(test_environ: dict[str, str]) -> Config:
    """A database of the module's own with the bundled ZTF alerts (ingested before the loop runs)."""
    from .apiclient import ingested_config

    return ingested_config(test_environ, "app")[0]


@pytest.fixture(scope="module")
async def api(api_cfg: Config, mongo_uri: str) -> AsyncIterator[Any]:
    from .apiclient import app_api

    async for served in app_api(api_cfg, mongo_uri):
        yield served


@pytest.fixture(scope="module")
async def users(api: Any) -> dict[str, str]:
    from .apiclient import app_users

    return await app_users(api)
