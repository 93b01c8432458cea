"""Embedded MongoDB-compatible server for development and tests.

Runs SecantusDB as a separate process, never imported (GPL-2.0-only): `secantusd-rs` when built
(see kowalski/services/secantus.py), else `secantusd-py` (PyPI `secantusdb`). Production uses a
real `mongod`: set MONGODB_URI (or `database.uri`) and nothing here runs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pymongo import MongoClient
from pymongo.errors import PyMongoError

from kowalski.services import secantus
from kowalski.services.process import (
    ServiceError,
    ensure_port_free,
    start_process,
    stop_process,
    wait_until,
)


@dataclass(frozen=True)
class Server:
    """One embedded server program and how to spell its options."""

    command: str
    executable: str

    def args(self, host: str, port: int, data_dir: Path, cache_size: str, sync: bool) -> list[str]:
        # both servers take the same flags (same project); kept here so a difference stays local
        cmd = [self.executable, "--host", host, "--port", str(port)]
        cmd += ["--storage-path", str(data_dir), "--cache-size", cache_size]
        cmd += ["--log-level", "WARNING"]
        return cmd + (["--sync-on-commit"] if sync else [])


def _python_server() -> Server:
    beside_python = Path(sys.executable).parent / secantus.PY_COMMAND
    found = str(beside_python) if beside_python.exists() else shutil.which(secantus.PY_COMMAND)
    if not found:
        raise ServiceError(
            f"cannot start the embedded database: '{secantus.PY_COMMAND}' not found "
            "(pip install -r requirements/test.txt, or set MONGODB_URI to a running mongod)"
        )
    return Server(secantus.PY_COMMAND, found)


def select_server() -> Server:
    """secantusd-rs when built (or forced), else secantusd-py; KOWALSKI_EMBEDDED_DB forces one."""
    try:
        forced = secantus.choice()
    except ValueError as exc:
        raise ServiceError(str(exc)) from None
    built = secantus.rs_binary()
    if forced == "py" or (forced is None and not built.exists()):
        return _python_server()
    if not built.exists():
        raise ServiceError(
            f"{secantus.CHOICE_ENV}=rs but {secantus.RS_COMMAND} is not built at {built} "
            "(./kowalski.py test or up --local builds it; needs cargo)"
        )
    return Server(secantus.RS_COMMAND, str(built))


def ping(uri: str, timeout_ms: int = 500) -> bool:
    client: MongoClient[dict[str, object]] = MongoClient(
        uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms
    )
    try:
        client.admin.command("ping")
        return True
    except PyMongoError:
        return False
    finally:
        client.close()


@dataclass
class EmbeddedMongo:
    """A SecantusDB server on `host:port` keeping its data in `data_dir` (the server program is
    chosen on the first start and kept across restarts)."""

    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    cache_size: str = "256M"
    sync_on_commit: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    server: Server | None = field(default=None, init=False)

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def start(self, timeout: float = 60) -> EmbeddedMongo:
        self.server = self.server or select_server()
        ensure_port_free(
            self.host, self.port, "the embedded database", "stop what holds it or set MONGODB_URI"
        )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = self.server.args(
            self.host, self.port, self.data_dir, self.cache_size, self.sync_on_commit
        )
        self.process = start_process(cmd, self.log_file)
        wait_until(
            lambda: ping(self.uri), self.process, timeout, "embedded database", self.log_file
        )
        return self

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None

    def __enter__(self) -> EmbeddedMongo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
