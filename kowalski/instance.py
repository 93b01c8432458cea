"""The running `up --local` instance, as other commands find it: a small JSON state file under
`local.var_dir` with the supervisor's pid, the database URI, the Kafka bootstrap servers and the
API URL. `up --local` writes it once everything is up and removes it when it stops; a file whose
process is gone (a supervisor killed with SIGKILL) is ignored. Standard library only: the
configuration loader reads it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "local-instance.json"


@dataclass(frozen=True)
class LocalInstance:
    pid: int
    mongodb_uri: str
    kafka_bootstrap_servers: str | None
    api_url: str


def state_path(var_dir: Path) -> Path:
    return var_dir / STATE_FILE


def _alive(pid: int) -> bool:
    """`pid` runs, and (where /proc tells) it is a Kowalski process, not a reused pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        return b"kowalski" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def write_instance(var_dir: Path, instance: LocalInstance) -> Path:
    """Write the state file atomically (a reader never sees half of it)."""
    path = state_path(var_dir)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(asdict(instance), indent=2) + "\n")
    partial.replace(path)
    return path


def read_instance(var_dir: Path) -> LocalInstance | None:
    """The running local instance, or None (no state file, unreadable, or its process is gone)."""
    try:
        instance = LocalInstance(**json.loads(state_path(var_dir).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return instance if _alive(instance.pid) else None


def remove_instance(var_dir: Path, pid: int) -> None:
    """Remove the state file if it is the one `pid` wrote (or an unreadable leftover)."""
    path = state_path(var_dir)
    try:
        owner = json.loads(path.read_text()).get("pid")
    except FileNotFoundError:
        return
    except (OSError, ValueError, AttributeError):
        owner = pid
    if owner == pid:
        path.unlink(missing_ok=True)
