"""Every Prometheus metric Kowalski exports, in one place (`prometheus-client`; the README's
"Metrics" section lists them from here), and the small HTTP server the ingester serves them on.

The ingester's metrics are recorded in the process that owns the Kafka consumer: the batch
reports come back from the dask workers (other processes) with their counts and stage timings,
and are recorded there, so nothing needs a multi-process registry. The API's gunicorn workers
share theirs through a directory (`MULTIPROCESS_ENV`, set by the API's gunicorn command), so any
worker's `/metrics` answers the sum of all of them.
"""

from __future__ import annotations

import collections
import http.server
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# seconds: from one batch's stage up to Rubin's 60 s from shutter to alert, and beyond
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
RATE_WINDOW_S = 60.0

# ------------------------------------------------------------------ ingester

CONSUMED = Counter(
    "kowalski_alerts_consumed", "Alert packets consumed from Kafka, per survey", ["survey"]
)
ARCHIVED = Counter(
    "kowalski_alerts_archived", "Alerts stored in the archive (new ones), per survey", ["survey"]
)
DUPLICATES = Counter(
    "kowalski_alerts_duplicate", "Alerts skipped as already processed, per survey", ["survey"]
)
DEAD_LETTERED = Counter(
    "kowalski_alerts_dead_lettered",
    "Packets that could not be decoded or stored (kept in dead_letters), per survey",
    ["survey"],
)
PASSES = Counter(
    "kowalski_filter_passes",
    "Alerts that passed a user filter, per survey and filter",
    ["survey", "filter_id"],
)
FILTER_FAILURES = Counter(
    "kowalski_filter_failures",
    "(filter, alert) runs that failed after their retries, per survey and filter",
    ["survey", "filter_id"],
)
ML_FAILURES = Counter("kowalski_ml_failures", "Alerts the ML stage could not score", ["survey"])
XMATCH_FAILURES = Counter(
    "kowalski_xmatch_failures", "Catalog cross-match queries that failed", ["survey"]
)
BATCH_RETRIES = Counter(
    "kowalski_batch_retries", "Batches whose task failed and was submitted again", ["survey"]
)
BATCH_SIZE = Histogram(
    "kowalski_batch_size", "Alerts per batch, per survey", ["survey"], buckets=SIZE_BUCKETS
)
STAGE_SECONDS = Histogram(
    "kowalski_stage_seconds",
    "Time one batch spent in a pipeline stage (decode, ml, xmatch, aux, store, filters, handoff, "
    "results, ...), per survey",
    ["survey", "stage"],
    buckets=LATENCY_BUCKETS,
)
ALERT_LATENCY = Histogram(
    "kowalski_alert_latency_seconds",
    "From the alert's Kafka message timestamp to a point of its batch: archived (alert and "
    "history stored), filtered (every filter run, its passes known), done (handed off, results "
    "committed), per survey",
    ["survey", "point"],
    buckets=LATENCY_BUCKETS,
)
DB_COMMANDS = Counter(
    "kowalski_db_commands",
    "Database commands (one round trip each) the pipeline's batches sent, per survey and command",
    ["survey", "command"],
)
CONSUMER_LAG = Gauge(
    "kowalski_kafka_consumer_lag",
    "Messages between the group's committed offset and the partition's end (librdkafka "
    "statistics), per topic and partition",
    ["topic", "partition"],
)
LEFT_GROUP = Counter(
    "kowalski_kafka_left_group",
    "Times the consumer exceeded max.poll.interval.ms and left its group",
)
RESULTS_TRANSACTIONS = Counter(
    "kowalski_results_transactions",
    "Results-stream batches by outcome (committed, aborted)",
    ["outcome"],
)
SKYPORTAL_DELIVERIES = Counter(
    "kowalski_skyportal_deliveries",
    "SkyPortal outbox entries by outcome (delivered, refused, retried)",
    ["outcome"],
)
SKYPORTAL_POST_LATENCY = Histogram(
    "kowalski_skyportal_post_latency_seconds",
    "From a SkyPortal outbox entry being queued (its batch's filters run) to SkyPortal accepting "
    "it, per survey and kind (candidate, photometry, ...)",
    ["survey", "kind"],
    buckets=LATENCY_BUCKETS,
)


class RateWindow:
    """Alerts per second over the last minute, per survey (for `kowalski.py status`, which reads
    one scrape and has no Prometheus to compute `rate()`)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self.events: dict[str, collections.deque[tuple[float, int]]] = {}
        self.lock = threading.Lock()

    def add(self, survey: str, count: int, now: float | None = None) -> None:
        with self.lock:
            self.events.setdefault(survey, collections.deque()).append(
                (time.monotonic() if now is None else now, count)
            )

    def rates(self, now: float | None = None) -> dict[str, float]:
        now = time.monotonic() if now is None else now
        with self.lock:
            out = {}
            for survey, events in self.events.items():
                while events and events[0][0] < now - self.window_s:
                    events.popleft()
                out[survey] = sum(count for _, count in events) / self.window_s
            return out


RATES = RateWindow()


class Sampled(Collector):
    """Gauges read when scraped: `sample()` returns {label values: value} per metric."""

    def __init__(
        self, name: str, documentation: str, labels: list[str], sample: Callable[[], Any]
    ) -> None:
        self.name, self.documentation, self.labels, self.sample = (
            name,
            documentation,
            labels,
            sample,
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        try:
            values: dict[tuple[str, ...], float] = self.sample()
        except Exception:  # a probe that fails says nothing rather than a wrong number
            values = {}
        for labels, value in values.items():
            family.add_metric(list(labels), value)
        yield family


_sampled: dict[str, Sampled] = {}


def sampled(name: str, documentation: str, labels: list[str], sample: Callable[[], Any]) -> None:
    """Register (or re-point, for a second ingester in one process: tests) a sampled gauge."""
    if name in _sampled:
        _sampled[name].sample = sample
        return
    _sampled[name] = Sampled(name, documentation, labels, sample)
    REGISTRY.register(_sampled[name])


sampled(
    "kowalski_alerts_per_second",
    "Alerts consumed per second over the last minute, per survey",
    ["survey"],
    lambda: {(survey,): rate for survey, rate in RATES.rates().items()},
)


def record_batch(survey: str, report: Any, kafka_timestamps_ms: Iterable[int]) -> None:
    """Record one finished batch (an `ingester.pipeline.BatchReport`)."""
    CONSUMED.labels(survey).inc(report.received)
    ARCHIVED.labels(survey).inc(report.stored)
    DUPLICATES.labels(survey).inc(report.duplicates)
    DEAD_LETTERED.labels(survey).inc(report.dead_letters)
    for filter_id, passes in report.passes_by_filter.items():
        PASSES.labels(survey, str(filter_id)).inc(passes)
    for filter_id, failures in report.failures_by_filter.items():
        FILTER_FAILURES.labels(survey, str(filter_id)).inc(failures)
    for command, count in report.commands.items():
        DB_COMMANDS.labels(survey, command).inc(count)
    ML_FAILURES.labels(survey).inc(report.ml_failures)
    XMATCH_FAILURES.labels(survey).inc(report.xmatch_failures)
    BATCH_SIZE.labels(survey).observe(report.received)
    for stage, seconds in report.seconds.items():
        STAGE_SECONDS.labels(survey, stage).observe(seconds)
    points = {**report.marks, "done": time.time()}
    for stamp in kafka_timestamps_ms:
        if stamp > 0:
            for point, at in points.items():
                ALERT_LATENCY.labels(survey, point).observe(max(0.0, at - stamp / 1000))
    RATES.add(survey, report.received)


def record_kafka_statistics(text: str) -> None:
    """librdkafka's statistics (the consumer's `stats_cb`): the group's lag per partition."""
    stats = json.loads(text)
    for topic, info in (stats.get("topics") or {}).items():
        for number, partition in (info.get("partitions") or {}).items():
            lag = partition.get("consumer_lag", -1)
            if number == "-1" or lag is None or lag < 0:
                continue
            CONSUMER_LAG.labels(topic, number).set(lag)


# set (by the API's gunicorn command) to a directory: the workers write their values there, and
# `/metrics` of any worker answers the sum of all of them
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def exposition() -> tuple[bytes, str]:
    if os.environ.get(MULTIPROCESS_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# ------------------------------------------------------------------ the ingester's endpoint

Probe = Callable[[], str | None]  # None: ready, else why not


class MetricsServer:
    """`/metrics`, `/healthz` (alive) and `/readyz` (each probe answers) over HTTP, in a daemon
    thread; 127.0.0.1 by default (`ingester.metrics_host`)."""

    def __init__(self, host: str, port: int, probes: dict[str, Probe]) -> None:
        probes_ = probes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/metrics":
                    body, kind = exposition()
                    self._answer(200, body, kind)
                elif path == "/healthz":
                    self._answer(200, b"ok\n", "text/plain")
                elif path == "/readyz":
                    failing = {name: why for name, probe in probes_.items() if (why := probe())}
                    status = 503 if failing else 200
                    body = json.dumps({"ready": not failing, "failing": failing}).encode()
                    self._answer(status, body + b"\n", "application/json")
                else:
                    self._answer(404, b"not found\n", "text/plain")

            def _answer(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # scrapes are not worth a log line each

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------ API

API_REQUESTS = Counter(
    "kowalski_api_requests",
    "API requests by route (its pattern), method and status",
    ["route", "method", "status"],
)
API_SECONDS = Histogram(
    "kowalski_api_request_seconds",
    "API request latency by route and method",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
API_QUERY_SECONDS = Histogram(
    "kowalski_api_query_seconds",
    "POST /api/queries latency by query type",
    ["query_type"],
    buckets=LATENCY_BUCKETS,
)
API_QUERIES_REFUSED = Counter(
    "kowalski_api_queries_refused",
    "Queries refused: the per-user cap (too many concurrent) or the deadline (max_time_ms)",
    ["reason"],
)
API_AUTH_FAILURES = Counter(
    "kowalski_api_auth_failures", "Requests refused for a missing or bad token or credentials"
)
