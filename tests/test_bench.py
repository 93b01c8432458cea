"""The night benchmark end to end at its tiniest: real Kafka, real ingester, real API. Only the
report's shape is checked (and what each mode sends to the database), never a timing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import bson
import pytest

from bench.__main__ import BATCHED, SINGLE, UPSTREAM, main, night_bench, parse_args, table
from bench.nightdata import FILTER_COUNT
from kowalski import monitoring
from kowalski.config import ROOT

RUN_KEYS = {
    "alerts_per_s",
    "stage_ms_per_alert",
    "client_cpu_ms_per_alert",
    "round_trips_per_alert",
    "round_trips_by_command",
    "latency_ms",
    "processes",
    "server_cpu_ms_per_alert",
}
SPREAD = {"median", "min", "max"}
Doc = dict[str, Any]


def tiny(*extra: str) -> list[str]:
    return [
        "--workers",
        "1",
        "--catalog-rows",
        "200",
        "--database",
        f"bench_{uuid.uuid4().hex[:8]}",
        *extra,
    ]


@pytest.fixture
def own_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers of the benchmark's own, as `./kowalski.py bench` runs from a fresh clone."""
    monkeypatch.delenv("MONGODB_URI", raising=False)
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)


def check_runs(mode: Doc, runs: int, alerts: int) -> None:
    assert len(mode["runs"]) == runs
    for run in mode["runs"]:
        assert set(run) >= RUN_KEYS and run["stored"] == alerts
        assert run["latency_ms"]["alerts"] == alerts
        assert {"filter_failures", "filter_retries", "xmatch_failures"} <= set(run)
    assert set(mode["summary"]["alerts/s end to end"]) == SPREAD
    assert mode["summary"]["alerts"] == {"median": alerts, "min": alerts, "max": alerts}


@pytest.mark.timeout(1800)
@pytest.mark.usefixtures("own_servers")
def test_tiniest_night_repeated(tmp_path: Path) -> None:
    png = tmp_path / "dashboard.png"
    args = parse_args(
        tiny(
            *("--night", "24", "--single", "0", "--upstream", "6", "--repeat", "2"),
            *("--api-requests", "8", "--api-concurrency", "2", "--api-processes", "1"),
            *("--dashboard", str(png)),
        )
    )
    results = night_bench(args)
    modes = results["modes"]
    assert list(modes) == [BATCHED, UPSTREAM]
    check_runs(modes[BATCHED], 2, 24)
    check_runs(modes[UPSTREAM], 2, 6)
    assert modes[UPSTREAM]["upstream_way"] and not modes[BATCHED]["upstream_way"]
    batched, upstream = modes[BATCHED]["runs"][0], modes[UPSTREAM]["runs"][0]
    # upstream's way: every filter its own aggregation per alert, plus the aux document's
    # count_documents (an aggregate command); batched: the filters share one per batch
    assert upstream["round_trips_by_command"]["aggregate"] >= (FILTER_COUNT + 1) * 6
    assert batched["round_trips_by_command"]["aggregate"] < 24
    assert (
        batched["db_bytes_per_alert"]["sent"] > 0 and batched["db_bytes_per_alert"]["received"] > 0
    )
    assert set(batched["db_bytes_per_alert_by_command"]) >= {"insert", "find"}
    assert {"ingester"} < set(batched["processes"])  # the ingester and its worker(s)
    assert {"database", "kafka"} <= set(batched["server_cpu_ms_per_alert"])
    assert set(results["ratios"]) == {"batched / upstream_way"}
    assert all(set(r) == SPREAD for r in results["ratios"].values())
    assert results["api"]["errors"] == {}
    assert sum(q["count"] for q in results["api"]["by_query"].values()) == 8
    assert [t["target"] for t in results["targets"]] and "upstream_way" in table(results)
    assert "LSST" not in " ".join(t["target"] for t in results["targets"])
    assert results["night"]["filters"] == 25 and len(results["night"]["synthetic_catalogs"]) == 7
    # the back-fill over the archive the last run (batched, the whole night) left: every alert of
    # it scanned once
    back = results["backfill"]
    assert back["scanned"] == 24 and back["alerts_per_s"] > 0, back
    assert "back-fill (filter" in table(results)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the dashboard of the first run


@pytest.mark.timeout(1800)
@pytest.mark.usefixtures("own_servers")
def test_tiniest_lsst_night_three_modes() -> None:
    """Real Rubin packets, Confluent-framed, through Kafka and the ingester in the three modes."""
    args = parse_args(
        tiny(
            *("--survey", "lsst", "--night", "12", "--history", "0.5"),
            *("--single", "3", "--upstream", "4", "--repeat", "1", "--api-requests", "0"),
        )
    )
    results = night_bench(args)
    assert results["night"]["survey"] == "LSST" and "data/lsst_alerts" in results["night"]["source"]
    assert list(results["modes"]) == [BATCHED, SINGLE, UPSTREAM]
    check_runs(results["modes"][BATCHED], 1, 12)
    check_runs(results["modes"][SINGLE], 1, 3)
    check_runs(results["modes"][UPSTREAM], 1, 4)
    assert set(results["ratios"]) == {"batched / upstream_way", "batched / one_at_a_time"}
    batched = results["modes"][BATCHED]["runs"][0]
    assert batched["dead_letters"] == 0 and batched["new_objects"] > 0
    assert [t["target"] for t in results["targets"]] == ["LSST night alerts/s end to end (batched)"]
    assert "api" not in results and "LSST night" in table(results)


def test_lsst_night_carries_forced_photometry() -> None:
    from bench.lsstnight import LSST, build_lsst_night, real_packets
    from bench.nightdata import NightSpec
    from ingester import shapes
    from ingester.decode import decode_for
    from ingester.registry_client import registry_for_survey
    from kowalski.config import build_config

    cfg = build_config([], {"KOWALSKI__server__insecure_dev": "true"})
    night = build_lsst_night(cfg, NightSpec(alerts=12))
    registry = registry_for_survey(cfg, LSST)
    parts = [shapes.split(LSST, decode_for(LSST, a.packet, registry)[0]) for a in night.alerts]
    assert [p.candid for p in parts] == [a.candid for a in night.alerts]  # new ids
    assert len({p.candid for p in parts}) == 12
    assert any(p.fp_hists for p in parts)  # the v7.1 packet's prvDiaForcedSources
    real = {r["diaSource"]["diaSourceId"] for _, r, _ in real_packets(cfg)}
    assert not real & {x.get("diaSourceId") for p in parts for x in p.prv_candidates}
    jds = [p.alert["candidate"]["jd"] for p in parts]
    assert jds == sorted(jds) and max(jds) - min(jds) < 1  # one night, in time order


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
    # bytes: the insert sends its 10 documents, the find receives them
    sent, received = used["bytes"]["insert things"]
    assert sent > 10 * len(bson.encode({"_id": bson.ObjectId(), "i": 0})) and received > 0
    assert used["bytes"]["find things"][1] > 10 * len(bson.encode({"i": 0}))
    assert monitoring.bytes_by_command(used["bytes"])["insert"] == [sent, received]
    assert used["cpu_s"] >= 0 and used["peak_rss_mb"] > 0


def test_cli_bench_help_lists_the_benchmarks_options() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "kowalski.py"), "bench", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: kowalski.py bench" in result.stdout
    assert all(
        f"--{option}" in result.stdout
        for option in ("repeat", "upstream", "survey", "night", "ingesters", "partitions")
    )


def test_micro_mode_is_still_there() -> None:
    assert parse_args(["--micro"]).micro and callable(main)
    assert parse_args([]).repeat == 3 and parse_args([]).survey == "ztf"


def test_scaling_mode_has_small_defaults_of_its_own() -> None:
    scaling = parse_args(["--ingesters", "2", "--workers", "3"])
    assert (scaling.night, scaling.repeat, scaling.workers) == (400, 1, 3)
    assert parse_args([]).night == 2000 and parse_args([]).ingesters == 0


RATIO_LINE = re.compile(r"^scaling ratio \(2 workers / 1 worker, alerts/s\): [0-9.]+x$", re.M)


@pytest.mark.timeout(600)
def test_scaling_bench_one_ingester_two_workers_prints_the_ratio(
    test_environ: dict[str, str], kafka_bootstrap: str, tmp_path: Path
) -> None:
    """`bench --ingesters 1 --workers 2` end to end on a tiny night: an external dask scheduler
    with 1 then 2 worker processes, an ingester process; both rates and the ratio printed."""
    out = tmp_path / "scaling.json"
    env = {
        **{k: v for k, v in test_environ.items() if not k.startswith("KOWALSKI")},
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
    }
    options = ["--ingesters", "1", "--workers", "2", "--night", "16", "--catalog-rows", "200"]
    database = ["--database", f"bench_{uuid.uuid4().hex[:8]}", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "kowalski.py"), "bench", *options, *database],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=540,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert RATIO_LINE.search(result.stdout), result.stdout[-3000:]
    assert re.search(r"^1 dask worker\(s\): [0-9.]+ alerts/s", result.stdout, re.M)
    assert re.search(r"^2 dask worker\(s\): [0-9.]+ alerts/s", result.stdout, re.M)
    results = json.loads(out.read_text())
    assert list(results["workers"]) == ["1", "2"] and results["ingesters"] == 1
    for workers, item in results["workers"].items():
        (run,) = item["runs"]
        assert run["alerts"] == 16 and run["workers"] == int(workers) and run["partitions"] == 4
        assert {"ingesters", "dask workers", "dask scheduler"} <= set(run["cpu_ms_per_alert"])
    assert set(results["scaling ratio"]) == SPREAD
