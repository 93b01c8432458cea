"""Embedded MongoDB-compatible server for development and tests.

Runs SecantusDB (`secantusd-py`, PyPI `secantusdb`, GPL-2.0-only) as a separate process; it is never
imported. Production uses a real `mongod`: set MONGODB_URI (or `database.uri`) and nothing here runs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pymongo import MongoClient
from pymongo.errors import PyMongoError

from kowalski.services._process import (
    ServiceError,
    ensure_port_free,
    start_process,
    stop_process,
    wait_until,
)

SERVER_COMMAND = "secantusd-py"


def _server_executable() -> str:
    beside_python = Path(sys.executable).parent / SERVER_COMMAND
    found = str(beside_python) if beside_python.exists() else shutil.which(SERVER_COMMAND)
    if not found:
        raise ServiceError(
            f"cannot start the embedded database: '{SERVER_COMMAND}' not found "
            "(pip install -r requirements/test.txt, or set MONGODB_URI to a running mongod)"
        )
    return found


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
    """A SecantusDB server on `host:port` keeping its data in `data_dir`."""

    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    cache_size: str = "256M"
    sync_on_commit: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def start(self, timeout: float = 60) -> EmbeddedMongo:
        executable = _server_executable()
        ensure_port_free(
            self.host, self.port, "the embedded database", "stop what holds it or set MONGODB_URI"
        )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            executable,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--storage-path",
            str(self.data_dir),
            "--cache-size",
            self.cache_size,
            "--log-level",
            "WARNING",
        ]
        if self.sync_on_commit:
            cmd.append("--sync-on-commit")
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
