"""The ingester's operations endpoint: Prometheus `/metrics`, `/healthz` and `/readyz` on
`ingester.metrics_host:metrics_port` (127.0.0.1:9309 by default), with the gauges read when
scraped: the SkyPortal outbox (entries waiting and the oldest one's age, per survey) and the dask
workers alive. Readiness: the database answers, Kafka answers, and, with the broker feed on,
SkyPortal answers HTTP."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from typing import Any

from pymongo import MongoClient

from kowalski import metrics
from kowalski.config import Config
from kowalski.db import mongo_uri
from kowalski.documents import Doc, utcnow
from kowalski.services.kafka import broker_ready

PROBE_TIMEOUT_S = 2.0
log = logging.getLogger("kowalski.ingester")


def database_probe(client: MongoClient[Doc]) -> metrics.Probe:
    def probe() -> str | None:
        try:
            client.admin.command("ping")
            return None
        except Exception as exc:  # any failure is "not ready", said in one line
            return f"database: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    return probe


def kafka_probe(bootstrap: str) -> metrics.Probe:
    def probe() -> str | None:
        return None if broker_ready(bootstrap, timeout=PROBE_TIMEOUT_S) else "kafka: no answer"

    return probe


def skyportal_probe(cfg: Config) -> metrics.Probe:
    sp = cfg.skyportal
    url = f"{sp.protocol}://{sp.host}:{sp.port}/"

    def probe() -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S):
                return None
        except urllib.error.HTTPError:
            return None  # it answers (a status is an answer)
        except OSError as exc:
            return f"skyportal: {url}: {exc}"

    return probe


def outbox_sample(client: MongoClient[Doc], cfg: Config) -> tuple[Any, Any]:
    """Samplers of the SkyPortal outbox: pending entries, and the oldest one's age, per survey."""
    outbox = client[cfg.database.db][cfg.database.collection("skyportal_outbox")]

    def groups() -> list[Doc]:
        pipeline: list[Doc] = [
            {"$match": {"state": "pending"}},
            {"$group": {"_id": "$survey", "n": {"$sum": 1}, "oldest": {"$min": "$created_at"}}},
        ]
        return list(outbox.aggregate(pipeline, maxTimeMS=int(PROBE_TIMEOUT_S * 1000)))

    def depth() -> dict[tuple[str, ...], float]:
        return {(str(g["_id"]),): float(g["n"]) for g in groups()}

    def age() -> dict[tuple[str, ...], float]:
        now = utcnow()
        return {
            (str(g["_id"]),): (now - g["oldest"]).total_seconds()
            for g in groups()
            if g.get("oldest") is not None
        }

    return depth, age


def serve(cfg: Config, dask_client: Any) -> metrics.MetricsServer | None:
    """Start the endpoint (None when `ingester.metrics_port` is 0)."""
    if not cfg.ingester.metrics_port:
        return None
    db: MongoClient[Doc] = MongoClient(
        mongo_uri(cfg),
        serverSelectionTimeoutMS=int(PROBE_TIMEOUT_S * 1000),
        connectTimeoutMS=int(PROBE_TIMEOUT_S * 1000),
        tz_aware=False,
    )
    probes = {"database": database_probe(db), "kafka": kafka_probe(cfg.kafka.bootstrap_servers)}
    if cfg.misc.broker:
        probes["skyportal"] = skyportal_probe(cfg)
        depth, age = outbox_sample(db, cfg)
        metrics.sampled(
            "kowalski_skyportal_outbox_pending",
            "SkyPortal outbox entries waiting, per survey",
            ["survey"],
            depth,
        )
        metrics.sampled(
            "kowalski_skyportal_outbox_oldest_seconds",
            "Age of the oldest SkyPortal outbox entry waiting, per survey",
            ["survey"],
            age,
        )
    metrics.sampled(
        "kowalski_dask_workers",
        "dask workers alive in the ingester's cluster",
        [],
        lambda: {(): float(len(dask_client.scheduler_info()["workers"]))},
    )
    host, port = cfg.ingester.metrics_host, cfg.ingester.metrics_port
    try:
        return metrics.MetricsServer(host, port, probes).start()
    except OSError as exc:  # ingesting matters more than its metrics: said, not fatal
        log.error(
            "metrics endpoint not served on %s:%d: %s (see ingester.metrics_port)", host, port, exc
        )
        db.close()
        return None
