"""The project's public helpers for starting real servers in tests (and in `up --local`): free
ports, starting a process with its log, waiting until it answers, stopping it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class ServiceError(RuntimeError):
    """A local service could not be started or reached; the message is one clear line."""


class ToolMissing(ServiceError):
    """A program a local service needs (java, mvn, ...) is not installed."""


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def ensure_port_free(host: str, port: int, what: str, hint: str) -> None:
    if port_in_use(host, port):
        raise ServiceError(f"cannot start {what}: port {port} on {host} is already in use ({hint})")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 5) -> str:
    if not path.exists():
        return ""
    text = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])


def wait_until(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    timeout: float,
    what: str,
    log: Path,
    required: bool = True,
) -> bool:
    """Poll `ready` until true; fail fast with the log tail if the process dies. When time runs
    out, a `required` service is stopped and an error; otherwise False is returned and the process
    keeps running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(
                f"{what} exited with code {proc.returncode} while starting: {tail(log)}"
            )
        if ready():
            return True
        time.sleep(0.2)
    if not required:
        return False
    stop_process(proc)
    raise ServiceError(f"{what} did not become ready within {timeout:.0f} s: {tail(log)}")


def start_process(
    cmd: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            env=dict(os.environ if env is None else env),
        )


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    """SIGTERM the process group, then SIGKILL if it does not exit in time."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass
