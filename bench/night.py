"""Run the benchmark night (bench/nightdata.py) through real Kafka and the real ingester
(ingester/consumer.py `Ingester` on a dask `LocalCluster` with worker processes) and measure it.

A mode = one pass of the whole night: the archive is reset (history preloaded again), the night is
produced to fresh topics by a separate producer process while the ingester consumes, and the run
ends when every alert's offset is committed (i.e. stored and filtered). Measured per mode:

- alerts/s end to end: alerts / (first produce -> last commit);
- per-stage ms per alert: `BatchReport.seconds` summed over workers / alerts (stages of different
  workers overlap in time, so the sum can exceed wall time per alert);
- client CPU ms per alert: CPU time (user + system) of the ingester process (consumer, dask scheduler)
  and of every worker process, over the run (`kowalski.monitoring`);
- database round trips per alert: commands sent by every PyMongo client of those processes
  (command monitoring), with the split by command;
- latency produce -> archive, p50 / p99: the producer's clock when it handed an alert to Kafka vs
  the `filter_runs.ran_at` of the first filter run over it, which is written right after the alert
  is stored (same machine clock);
- peak RSS per process; CPU of the database and Kafka servers when they are ours.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from distributed import Client, WorkerPlugin

from bench.nightdata import Night
from bench.upstream import process_upstream
from ingester.consumer import Ingester, close_cluster, start_cluster
from kowalski import monitoring
from kowalski.config import Config, build_config
from kowalski.db import sync_client
from kowalski.services.kafka import LocalKafka
from kowalski.services.mongo import EmbeddedMongo
from kowalski.services.process import free_port
from kowalski.surveys import SURVEYS

Doc = dict[str, Any]
MODE_DEADLINE_S = 3600.0
ASSIGNMENT_DEADLINE_S = 120.0


@dataclass
class Services:
    """The database and Kafka the benchmark runs against (ours unless given by the environment)."""

    mongo_uri: str
    bootstrap: str
    database: str
    pids: dict[str, int] = field(default_factory=dict)


@contextmanager
def services(workdir: Path) -> Iterator[Services]:
    """MONGODB_URI / KAFKA_BOOTSTRAP_SERVERS if set, else an embedded database and a local Kafka."""
    started: list[Any] = []
    try:
        uri = os.environ.get("MONGODB_URI")
        pids: dict[str, int] = {}
        database = "MONGODB_URI"
        if not uri:
            mongo = EmbeddedMongo(workdir / "db", free_port()).start()
            started.append(mongo)
            uri, database = mongo.uri, f"embedded ({Path(str(mongo.process.args[0])).name})"  # type: ignore[union-attr,index]
            pids["database"] = mongo.process.pid  # type: ignore[union-attr]
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            kafka = LocalKafka.on_free_ports(workdir / "kafka").start()
            started.append(kafka)
            bootstrap = kafka.bootstrap_servers
            pids["kafka"] = kafka.process.pid  # type: ignore[union-attr]
        yield Services(uri, bootstrap, database, pids)
    finally:
        for server in reversed(started):
            server.stop()


def bench_environ(svc: Services, db_name: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("KOWALSKI")},
        "MONGODB_URI": svc.mongo_uri,
        "KAFKA_BOOTSTRAP_SERVERS": svc.bootstrap,
        "KOWALSKI__database__db": db_name,
        "KOWALSKI__server__insecure_dev": "true",  # the API mode logs in as admin/admin
    }


def mode_config(
    env: dict[str, str], survey: str, suffix: str, batch_size: int, workers: int
) -> Config:
    cfg = build_config(
        [],
        {
            **env,
            f"KOWALSKI__kafka__topics__{survey}": f"{SURVEYS[survey].topic_pattern}{suffix}$",
            "KOWALSKI__ingester__batch_size": str(batch_size),
            "KOWALSKI__dask__n_workers": str(workers),
        },
    )
    dask = cfg.dask.model_copy(update={"dashboard_address": None, "lifetime": None})
    return cfg.model_copy(update={"dask": dask})


# --- producer process ----------------------------------------------------------------------------


def write_night(night: Night, path: Path) -> None:
    with path.open("wb") as out:
        pickle.dump([(a.topic, a.candid, a.packet) for a in night.alerts], out)


def produce(
    bootstrap: str, night_file: str, suffix: str, rate: float, times_file: str, partitions: int = 1
) -> None:
    """Producer process: the night in time order (paced at `rate` alerts/s if > 0), each topic's
    alerts dealt over its `partitions` partitions in turn; writes {candid: unix time handed to
    Kafka}."""
    with open(night_file, "rb") as stream:
        alerts = pickle.load(stream)
    producer = Producer(
        {"bootstrap.servers": bootstrap, "message.max.bytes": 10_485_760, "linger.ms": 5}
    )
    times: dict[int, float] = {}
    dealt: dict[str, int] = {}
    start = time.time()
    for number, (topic, candid, packet) in enumerate(alerts):
        if rate > 0:
            delay = start + number / rate - time.time()
            if delay > 0:
                time.sleep(delay)
        partition = dealt.get(topic, 0) % partitions
        dealt[topic] = partition + 1
        while True:
            try:
                producer.produce(topic + suffix, packet, partition=partition)
                break
            except BufferError:
                producer.poll(0.1)
        times[candid] = time.time()
        producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("the night was not fully delivered to Kafka")
    Path(times_file).write_text(json.dumps(times))


def create_topics(bootstrap: str, topics: list[str]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(t, num_partitions=1) for t in topics])
    for future in futures.values():
        future.result(timeout=60)


# --- measurements ----------------------------------------------------------------------------------


class MonitorPlugin(WorkerPlugin):
    """Registers the PyMongo command counter in every worker before any client is created."""

    idempotent = True
    name = "kowalski-bench-monitoring"

    def setup(self, worker: Any) -> None:
        monitoring.install()


def process_snapshots(client: Client) -> dict[str, Doc]:
    workers = client.run(monitoring.snapshot)
    return {"ingester": monitoring.snapshot(), **{f"worker {k}": v for k, v in workers.items()}}


def server_cpu(pids: dict[str, int]) -> dict[str, float]:
    import psutil  # type: ignore[import-untyped]  # psutil ships no type stubs

    out = {}
    for role, pid in pids.items():
        try:
            times = psutil.Process(pid).cpu_times()
            out[role] = times.user + times.system
        except psutil.Error:
            continue
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def stored_times(cfg: Config) -> dict[int, float]:
    """{candid: unix time of the first filter run over it} (written right after it was stored)."""
    import datetime as dt

    first: dict[int, float] = {}
    with sync_client(cfg) as client:
        runs = client[cfg.database.db][cfg.database.collections["filter_runs"]]
        for run in runs.find({}, {"_id": 0, "candids": 1, "ran_at": 1}):
            when = run["ran_at"].replace(tzinfo=dt.UTC).timestamp()
            for candid in run["candids"]:
                if when < first.get(candid, float("inf")):
                    first[candid] = when
    return first


def latency_ms(produced: dict[int, float], stored: dict[int, float]) -> Doc:
    values = [(stored[candid] - t) * 1e3 for candid, t in produced.items() if candid in stored]
    return {
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "alerts": len(values),
    }


# --- one mode --------------------------------------------------------------------------------------


@dataclass
class Timeline:
    first_produce: float | None = None
    last_commit: float | None = None
    error: str | None = None


def coordinate(
    ingester: Ingester,
    topics: list[str],
    expected: int,
    start_producer: Any,
    stop: threading.Event,
    timeline: Timeline,
) -> None:
    """Start producing once the ingester owns the night's partitions; stop it when all committed."""
    deadline = time.monotonic() + ASSIGNMENT_DEADLINE_S
    try:
        while {t for t, _ in ingester.assigned} < set(topics):
            if time.monotonic() > deadline:
                raise TimeoutError(f"partitions of {topics} never assigned")
            time.sleep(0.05)
        timeline.first_produce = time.time()
        start_producer()
        deadline = time.monotonic() + MODE_DEADLINE_S
        while ingester.committed < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {ingester.committed}/{expected} alerts committed")
            time.sleep(0.02)
        timeline.last_commit = time.time()
    except Exception as exc:  # reported with the results, never a silent wrong figure
        timeline.error = f"{type(exc).__name__}: {exc}"
    finally:
        stop.set()


def run_mode(
    env: dict[str, str],
    svc: Services,
    night: Night,
    night_file: Path,
    label: str,
    batch_size: int,
    workers: int,
    rate: float,
    upstream: bool = False,
) -> Doc:
    """One pass of the night; `upstream`: each batch processed alert by alert, upstream's way
    (bench/upstream.py), instead of the ingester's batched pipeline."""
    suffix = f"_{label}_{os.getpid()}_{int(time.time())}"
    cfg = mode_config(env, night.survey, suffix, batch_size, workers)
    topics = [t + suffix for t in night.topics]
    create_topics(svc.bootstrap, topics)
    monitoring.install()
    client = start_cluster(cfg)
    times_file = night_file.with_suffix(f".{label}.times.json")
    producer = multiprocessing.get_context("spawn").Process(
        target=produce,
        args=(svc.bootstrap, str(night_file), suffix, rate, str(times_file)),
        daemon=True,
    )
    try:
        client.wait_for_workers(workers)
        client.register_plugin(MonitorPlugin(), name=MonitorPlugin.name)
        ingester = Ingester(cfg, client, svc.bootstrap, [night.survey], group=f"bench{suffix}")
        if upstream:
            ingester.task = process_upstream
        before, servers_before = process_snapshots(client), server_cpu(svc.pids)
        stop, timeline = threading.Event(), Timeline()
        watcher = threading.Thread(
            target=coordinate,
            args=(ingester, topics, len(night.alerts), producer.start, stop, timeline),
            daemon=True,
        )
        watcher.start()
        report = ingester.run(stop=stop)
        watcher.join()
        after, servers_after = process_snapshots(client), server_cpu(svc.pids)
    finally:
        close_cluster(client)
    producer.join(timeout=120)
    if timeline.error or timeline.first_produce is None or timeline.last_commit is None:
        raise RuntimeError(f"mode {label}: {timeline.error}")
    produced = {int(k): v for k, v in json.loads(times_file.read_text()).items()}
    n = report.stored
    wall = timeline.last_commit - timeline.first_produce
    processes = {
        role: monitoring.delta(before[role], after[role]) for role in after if role in before
    }
    commands: dict[str, int] = {}
    sizes: dict[str, list[int]] = {}
    for usage in processes.values():
        for name, count in usage["commands"].items():
            commands[name] = commands.get(name, 0) + count
        for name, (sent, received) in usage["bytes"].items():
            total = sizes.setdefault(name, [0, 0])
            total[0] += sent
            total[1] += received
    per_alert = 1e3 / max(n, 1)
    return {
        "batch_size": batch_size,
        "upstream_way": upstream,
        "workers": workers,
        "alerts": len(night.alerts),
        "stored": n,
        "duplicates": report.duplicates,
        "dead_letters": report.dead_letters,
        "new_objects": report.new_objects,
        "updated_objects": report.updated_objects,
        "passed_filters": report.passed,
        # failures are counted, never hidden in a figure: a filter that timed out on an alert
        # (after its retries) is a (filter, alert) pair recorded failed
        "filter_failures": report.filter_failures,
        "filter_retries": report.filter_retries,
        "xmatch_failures": report.xmatch_failures,
        "wall_s": wall,
        "alerts_per_s": n / wall if wall > 0 else None,
        "stage_ms_per_alert": {k: v * per_alert for k, v in report.seconds.items()},
        "client_cpu_ms_per_alert": sum(p["cpu_s"] for p in processes.values()) * per_alert,
        "round_trips_per_alert": sum(commands.values()) / max(n, 1),
        "round_trips_by_command": monitoring.by_command(commands),
        "round_trips_by_target": dict(sorted(commands.items(), key=lambda kv: -kv[1])),
        "db_bytes_per_alert": {
            "sent": sum(b[0] for b in sizes.values()) / max(n, 1),
            "received": sum(b[1] for b in sizes.values()) / max(n, 1),
        },
        "db_bytes_per_alert_by_command": {
            name: {"sent": sent / max(n, 1), "received": received / max(n, 1)}
            for name, (sent, received) in monitoring.bytes_by_command(sizes).items()
        },
        "latency_ms": latency_ms(produced, stored_times(cfg)),
        "processes": processes,
        "server_cpu_ms_per_alert": {
            role: (servers_after[role] - servers_before[role]) * per_alert
            for role in servers_after
            if role in servers_before
        },
    }


def night_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="kowalski-bench-night-"))
