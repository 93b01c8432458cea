"""Per-process measurements for benchmarks and diagnostics: database round trips and bytes
(PyMongo command monitoring), CPU time and peak resident memory.

`install()` registers one process-wide PyMongo `CommandListener`; it counts every command sent to a
server (each is one round trip: `find`, `getMore`, `insert`, `aggregate`, ...) by command name and
the collection it targets (`"find ZTF_alerts_aux"`), for every client created after the call, with
the BSON size of each command and of its reply (re-encoded here: a cost only where installed, the
benchmark). `snapshot()` returns the counts with this process's CPU time and peak RSS, as plain
data that can cross process boundaries (e.g. `dask.Client.run`); `delta()` subtracts two snapshots
of the same process.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from collections import Counter
from typing import Any

import bson
from pymongo import monitoring


class CommandCounter(monitoring.CommandListener):
    """Counts started commands by "name collection", and (`measure_bytes`) the bytes of the
    commands sent and of the replies received; thread-safe (drivers call it from several
    threads). Without bytes it costs a dictionary update per command: the ingester's workers
    give each database client one to count its batches' round trips (`take`)."""

    def __init__(self, measure_bytes: bool = True) -> None:
        self.measure_bytes = measure_bytes
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self._open: dict[tuple[Any, int], str] = {}  # (connection, request id) -> key

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        target = event.command.get(name)
        if not isinstance(target, str):  # getMore names its cursor; the collection is apart
            target = event.command.get("collection", "")
        key = f"{name} {target}".rstrip()
        if not self.measure_bytes:
            with self._lock:
                self.counts[key] += 1
            return
        size = len(bson.encode(event.command))
        with self._lock:
            self.counts[key] += 1
            self.sent[key] += size
            self._open[(event.connection_id, event.request_id)] = key

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        if not self.measure_bytes:
            return
        size = len(bson.encode(event.reply))
        with self._lock:
            key = self._open.pop((event.connection_id, event.request_id), event.command_name)
            self.received[key] += size

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        with self._lock:
            self._open.pop((event.connection_id, event.request_id), None)

    def copy(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def take(self) -> dict[str, int]:
        """The counts by command name since the last `take`, which clears them."""
        with self._lock:
            counts, self.counts = self.counts, Counter()
        return by_command(counts)

    def copy_bytes(self) -> dict[str, list[int]]:
        """{"name collection": [bytes sent, bytes received]}."""
        with self._lock:
            return {key: [self.sent[key], self.received[key]] for key in self.sent}


_COUNTER: CommandCounter | None = None
_INSTALL_LOCK = threading.Lock()


def install() -> CommandCounter:
    """Register the process-wide counter once (idempotent); clients created later report to it."""
    global _COUNTER
    with _INSTALL_LOCK:
        if _COUNTER is None:
            _COUNTER = CommandCounter()
            monitoring.register(_COUNTER)
        return _COUNTER


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def snapshot() -> dict[str, Any]:
    """{pid, cpu_s, peak_rss_mb, commands: {"name collection": count}, bytes: {"name
    collection": [sent, received]}} of this process."""
    return {
        "pid": os.getpid(),
        "cpu_s": cpu_seconds(),
        "peak_rss_mb": peak_rss_mb(),
        "commands": _COUNTER.copy() if _COUNTER is not None else {},
        "bytes": _COUNTER.copy_bytes() if _COUNTER is not None else {},
    }


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What happened in one process between two snapshots (peak RSS is the later peak)."""
    names = set(before["commands"]) | set(after["commands"])
    commands = {
        name: after["commands"].get(name, 0) - before["commands"].get(name, 0) for name in names
    }
    sizes = {
        name: [
            now - then
            for now, then in zip(
                after["bytes"].get(name, [0, 0]), before["bytes"].get(name, [0, 0]), strict=True
            )
        ]
        for name in set(before["bytes"]) | set(after["bytes"])
    }
    return {
        "pid": after["pid"],
        "cpu_s": after["cpu_s"] - before["cpu_s"],
        "peak_rss_mb": after["peak_rss_mb"],
        "commands": {name: n for name, n in sorted(commands.items()) if n},
        "bytes": {name: b for name, b in sorted(sizes.items()) if any(b)},
    }


def by_command(commands: dict[str, int]) -> dict[str, int]:
    """Counts of `snapshot()["commands"]` summed per command name, most frequent first."""
    totals: Counter[str] = Counter()
    for key, count in commands.items():
        totals[key.split(" ", 1)[0]] += count
    return dict(totals.most_common())


def bytes_by_command(sizes: dict[str, list[int]]) -> dict[str, list[int]]:
    """[sent, received] of `snapshot()["bytes"]` summed per command name, most bytes first."""
    totals: dict[str, list[int]] = {}
    for key, (sent, received) in sizes.items():
        total = totals.setdefault(key.split(" ", 1)[0], [0, 0])
        total[0] += sent
        total[1] += received
    return dict(sorted(totals.items(), key=lambda kv: -sum(kv[1])))
