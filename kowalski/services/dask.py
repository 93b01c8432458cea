"""A dask.distributed cluster of its own for tests: workers as threads of this process (fast to
start, a fault can be injected in-process) or as processes (a worker can be killed), listening on
127.0.0.1 only and on no fixed port (the dashboard takes a free one). `ExternalCluster`: a
scheduler and workers as separate processes, as a deployment over several hosts runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from distributed import Client, LocalCluster

from kowalski.config import ROOT
from kowalski.services.process import (
    free_port,
    port_in_use,
    start_process,
    stop_process,
    wait_until,
)


@contextmanager
def local_cluster(workers: int = 2, processes: bool = False) -> Iterator[Client]:
    """A client of a new LocalCluster of `workers` single-threaded workers, closed on exit."""
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=processes,
            # worker processes talk TCP on loopback; threads talk in-process (no address)
            **({"host": "127.0.0.1"} if processes else {}),
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@dataclass
class ExternalCluster:
    """A `dask scheduler` and its `dask worker`s as separate OS processes on 127.0.0.1 (what a
    multi-host deployment runs, on one machine): the address is the ingesters'
    `dask.scheduler_address`. Workers import the project from `ROOT` (PYTHONPATH)."""

    log_dir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    scheduler: subprocess.Popen[bytes] | None = field(default=None, init=False)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False)

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        path = self.env.get("PYTHONPATH")
        return {**self.env, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}

    def start(self, workers: int, timeout: float = 180) -> ExternalCluster:
        log = self.log_dir / "dask-scheduler.log"
        self.scheduler = start_process(
            [
                *(sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1"),
                *("--port", str(self.port), "--dashboard-address", "127.0.0.1:0"),
            ],
            log,
            cwd=ROOT,
            env=self._env(),
        )
        wait_until(
            lambda: port_in_use("127.0.0.1", self.port), self.scheduler, timeout, "dask", log
        )
        for _ in range(workers):
            self.add_worker()
        with Client(self.address, timeout=timeout) as client:
            client.wait_for_workers(len(self.workers), timeout=timeout)
        return self

    def add_worker(self) -> subprocess.Popen[bytes]:
        n = len(self.workers)
        worker = start_process(
            [
                *(sys.executable, "-m", "distributed.cli.dask_worker", self.address),
                *("--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1"),
                *("--no-dashboard", "--name", f"worker-{n}"),
            ],
            self.log_dir / f"dask-worker-{n}.log",
            cwd=ROOT,
            env=self._env(),
        )
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            stop_process(worker)
        stop_process(self.scheduler)
        self.workers, self.scheduler = [], None

    def __enter__(self) -> ExternalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
