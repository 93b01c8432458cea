"""The API served by gunicorn with aiohttp's uvloop worker, as in production."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kowalski.config import ROOT, Config
from kowalski.metrics import MULTIPROCESS_ENV
from kowalski.services.process import ensure_port_free, start_process, stop_process, wait_until


def metrics_directory(port: int) -> Path:
    """A new, empty directory for one API server's metrics (its owner removes it)."""
    return Path(tempfile.mkdtemp(prefix=f"kowalski-api-metrics-{port}-"))


def gunicorn_command(
    cfg: Config, host: str, port: int, metrics_dir: Path, workers: int | None = None
) -> list[str]:
    """The gunicorn command line; its workers share their metrics through `metrics_dir`
    (prometheus-client's multiprocess mode), so `/metrics` sums every worker's."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--env",
        f"{MULTIPROCESS_ENV}={metrics_dir}",
        "--workers",
        str(workers or cfg.server.processes),
        "--bind",
        f"{host}:{port}",
        "--worker-class",
        "aiohttp.GunicornUVLoopWebWorker",
        "--timeout",
        str(cfg.server.timeout),
        "--max-requests",
        str(cfg.server.max_requests),
        "--no-control-socket",
        "api.app:app_factory",
    ]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            status: int = response.status
            return status < 500
    except urllib.error.HTTPError as exc:  # 401 without a token: it is up
        return exc.code < 500
    except OSError:
        return False


@dataclass
class ApiServer:
    cfg: Config
    port: int
    log_file: Path
    env: dict[str, str]
    host: str = "127.0.0.1"
    workers: int | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    metrics_dir: Path | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60) -> ApiServer:
        ensure_port_free(
            self.host, self.port, "the API", "stop what holds it or change server.port"
        )
        self.metrics_dir = metrics_directory(self.port)
        cmd = gunicorn_command(self.cfg, self.host, self.port, self.metrics_dir, self.workers)
        try:
            self.process = start_process(cmd, self.log_file, cwd=ROOT, env=self.env)
            wait_until(
                lambda: answers(self.url + "/docs/api/openapi.json"),
                self.process,
                timeout,
                "the API",
                self.log_file,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stops the server and removes its metrics directory."""
        stop_process(self.process)
        self.process = None
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None
