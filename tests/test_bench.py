"""The night benchmark end to end at its tiniest: real Kafka, real ingester, real API. Only the
report's shape is checked, never a timing."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from bench.__main__ import main, night_bench, parse_args, table
from kowalski import monitoring

MODE_KEYS = {
    "alerts_per_s",
    "stage_ms_per_alert",
    "client_cpu_ms_per_alert",
    "round_trips_per_alert",
    "round_trips_by_command",
    "latency_ms",
    "processes",
    "server_cpu_ms_per_alert",
}


@pytest.mark.timeout(1800)
def test_tiniest_night_report_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """With servers of its own, as `./kowalski.py bench` runs from a fresh clone."""
    monkeypatch.delenv("MONGODB_URI", raising=False)
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    args = parse_args(
        [
            "--night",
            "50",
            "--single",
            "10",
            "--workers",
            "1",
            "--catalog-rows",
            "200",
            "--api-requests",
            "8",
            "--api-concurrency",
            "2",
            "--api-processes",
            "1",
            "--database",
            f"bench_{uuid.uuid4().hex[:8]}",
        ]
    )
    results = night_bench(args)
    assert set(results["modes"]) == {"batched", "one_at_a_time"}
    batched, single = results["modes"]["batched"], results["modes"]["one_at_a_time"]
    assert set(batched) >= MODE_KEYS and set(single) >= MODE_KEYS
    assert batched["stored"] == 50 and single["stored"] == 10
    assert batched["round_trips_per_alert"] > 0  # counted through PyMongo command monitoring
    assert {"ingester"} < set(batched["processes"])  # the ingester and its worker(s)
    assert {"database", "kafka"} <= set(batched["server_cpu_ms_per_alert"])
    assert set(batched["latency_ms"]) == {"p50", "p99", "alerts"}
    assert batched["latency_ms"]["alerts"] == 50
    assert "speedup" in results
    assert results["api"]["errors"] == {}
    assert sum(q["count"] for q in results["api"]["by_query"].values()) == 8
    assert [t["target"] for t in results["targets"]] and "batched" in table(results)
    assert results["night"]["filters"] == 25 and len(results["night"]["synthetic_catalogs"]) == 7


def test_command_counter_counts_round_trips(mongo_uri: str) -> None:
    from pymongo import MongoClient

    monitoring.install()
    before = monitoring.snapshot()
    with MongoClient[dict[str, Any]](mongo_uri) as client:
        coll = client[f"monitoring_{uuid.uuid4().hex[:8]}"].things
        coll.insert_many([{"i": i} for i in range(10)])
        assert len(coll.find({}).to_list()) == 10
    used = monitoring.delta(before, monitoring.snapshot())
    assert used["commands"]["insert things"] == 1 and used["commands"]["find things"] == 1
    totals = monitoring.by_command(used["commands"])
    assert totals["insert"] == 1 and totals["find"] == 1
    assert used["cpu_s"] >= 0 and used["peak_rss_mb"] > 0


def test_micro_mode_is_still_there() -> None:
    assert parse_args(["--micro"]).micro and callable(main)
