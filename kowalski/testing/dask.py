"""A dask.distributed cluster of its own for tests: workers as threads of this process (fast to
start, a fault can be injected in-process) or as processes (a worker can be killed), listening on
127.0.0.1 only and on no fixed port (the dashboard takes a free one)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster


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
