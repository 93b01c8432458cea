"""Operations metrics (issue #25) against real servers: the ingester's endpoint scraped around a
replay of real ZTF packets (the counters move by the packets' number, the consumer lag comes back
to 0), the API's `/metrics` (admins only), `/healthz` and `/readyz` (false while its database is
stopped, true once it is back), and `kowalski.py status` reading them."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from distributed import Client
from pymongo import MongoClient

from api.app import app_factory
from ingester.consumer import Ingester
from ingester.endpoint import serve
from ingester.replay import replay
from kowalski.config import ROOT, Config, build_config
from kowalski.services.mongo import EmbeddedMongo
from kowalski.services.process import free_port
from kowalski.testing.filters import filter_document
from ops.status import report, samples

from .conftest import ZTF_ALERTS
from .test_ingestion import dask_client  # noqa: F401  (module fixture, reused)
from .test_results import results_env

DEADLINE_S = 240.0
EVERYTHING: list[dict[str, Any]] = [{"$match": {"candid": {"$gt": 0}}}]


def wait_for(condition: Callable[[], bool], what: str, seconds: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds:.0f} s"
        time.sleep(0.5)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when none)."""
    found = samples(text).get(name, [])
    return sum(v for lb, v in found if all(lb.get(k) == x for k, x in labels.items()))


def test_ingester_endpoint_counts_a_replay(
    test_environ: dict[str, str],
    kafka_bootstrap: str,
    mongo_uri: str,
    dask_client: Client,  # noqa: F811
) -> None:
    tag = uuid.uuid4().hex[:8]
    port = free_port()
    env = results_env(
        test_environ,
        kafka_bootstrap,
        tag,
        KOWALSKI__ingester__batch_size="16",
        KOWALSKI__ingester__metrics_port=str(port),
        KOWALSKI__ingester__statistics_interval_ms="500",
    )
    cfg = build_config([], env)
    db: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    packets = sorted(ZTF_ALERTS.rglob("*.avro"))
    endpoint = serve(cfg, dask_client)
    assert endpoint is not None and endpoint.port == port
    url = f"http://127.0.0.1:{port}"
    try:
        db[cfg.database.db].filters.insert_one(filter_document(1, EVERYTHING))
        before = get(f"{url}/metrics")[1]
        replay(kafka_bootstrap, packets, suffix=f"_{tag}", progress=False)
        ingester = Ingester(cfg, dask_client, kafka_bootstrap, ["ZTF"], group=f"g-{tag}")
        stop = threading.Event()
        running = threading.Thread(target=ingester.run, kwargs={"stop": stop}, daemon=True)
        running.start()

        def scrape() -> str:
            return get(f"{url}/metrics")[1]

        def lag_of_test_topics(text: str) -> list[float]:
            return [
                v
                for lb, v in samples(text).get("kowalski_kafka_consumer_lag", [])
                if lb["topic"].endswith(f"_{tag}")
            ]

        try:
            wait_for(
                lambda: (
                    value(scrape(), "kowalski_alerts_archived_total", survey="ZTF")
                    - value(before, "kowalski_alerts_archived_total", survey="ZTF")
                    >= len(packets)
                ),
                "every packet archived",
            )
            # the lag reported for the test's partitions comes back to 0 once all is committed
            wait_for(
                lambda: (lags := lag_of_test_topics(scrape())) != [] and not any(lags),
                "consumer lag back to 0",
            )
        finally:
            stop.set()
            running.join(timeout=120)
        after = scrape()

        def moved(name: str, **labels: str) -> float:
            return value(after, name, survey="ZTF", **labels) - value(
                before, name, survey="ZTF", **labels
            )

        assert moved("kowalski_alerts_consumed_total") == len(packets) == 38
        assert moved("kowalski_alerts_archived_total") == 38
        assert moved("kowalski_alerts_dead_lettered_total") == 0
        # the filter passes everything, counted per filter
        assert moved("kowalski_filter_passes_total", filter_id="1") == 38
        assert moved("kowalski_filter_failures_total") == 0
        # latency to each point of the batch, each alert once per point, in the batch's order
        latency = "kowalski_alert_latency_seconds"
        points = ("archived", "filtered", "done")
        assert [moved(f"{latency}_count", point=p) for p in points] == [38, 38, 38]
        sums = [moved(f"{latency}_sum", point=p) for p in points]
        assert 0 < sums[0] <= sums[1] <= sums[2], sums
        # round trips: every batch (at least 3 of at most 16 alerts) inserts its alerts and runs
        # the filters in one aggregation
        assert moved("kowalski_db_commands_total", command="insert") >= 3
        assert moved("kowalski_db_commands_total", command="aggregate") >= 3
        assert moved("kowalski_stage_seconds_count") > 0
        assert value(after, "kowalski_alerts_per_second", survey="ZTF") > 0
        assert value(after, "kowalski_dask_workers") >= 1
        status, body = get(f"{url}/readyz")
        assert status == 200, body
        assert get(f"{url}/healthz")[0] == 200
        screen = report(cfg)  # kowalski.py status: the ingester's figures (no API runs here)
        assert "ingester: ready" in screen and "\nZTF " in screen, screen
    finally:
        endpoint.stop()
        db.close()


@pytest.fixture
async def own_database(tmp_path: Path) -> AsyncIterator[EmbeddedMongo]:
    """A database server of this test's own, to stop and start again."""
    server = EmbeddedMongo(tmp_path / "db", free_port()).start()
    try:
        yield server
    finally:
        server.stop()


async def test_api_metrics_are_for_admins_and_readiness_follows_the_database(
    test_environ: dict[str, str], own_database: EmbeddedMongo
) -> None:
    cfg: Config = build_config([], {**test_environ, "MONGODB_URI": own_database.uri})
    client: TestClient[Any, Any] = TestClient(TestServer(await app_factory(cfg)))
    await client.start_server()
    try:

        async def call(path: str, token: str | None = None) -> tuple[int, str]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with client.get(path, headers=headers) as response:
                return response.status, await response.text()

        async with client.post(
            "/api/auth", json={"username": "admin", "password": "admin"}
        ) as response:
            admin = (await response.json())["token"]
        async with client.post(
            "/api/users",
            json={"username": "reader", "password": "reader-pw"},
            headers={"Authorization": f"Bearer {admin}"},
        ) as response:
            assert response.status == 200
        async with client.post(
            "/api/auth", json={"username": "reader", "password": "reader-pw"}
        ) as response:
            reader = (await response.json())["token"]

        assert (await call("/metrics"))[0] == 401  # never anonymous
        assert (await call("/metrics", reader))[0] == 403
        status, text = await call("/metrics", admin)
        assert status == 200
        assert value(text, "kowalski_api_requests_total", route="/api/auth", status="200") >= 2
        assert value(text, "kowalski_api_auth_failures_total") >= 1
        assert (await call("/healthz"))[0] == 200
        assert (await call("/readyz"))[0] == 200

        own_database.stop()
        status, body = await call("/readyz")
        assert status == 503 and "database" in body, body
        assert (await call("/healthz"))[0] == 200  # alive all the same
        own_database.start()
        deadline = time.monotonic() + DEADLINE_S
        while (await call("/readyz"))[0] != 200:
            assert time.monotonic() < deadline, "not ready again"
            await asyncio.sleep(0.5)
    finally:
        await client.close()


def test_status_says_what_does_not_answer(test_environ: dict[str, str]) -> None:
    """Nothing runs on these ports: the screen says so, per component, instead of failing."""
    env = {
        **test_environ,
        "KOWALSKI__server__port": str(free_port()),
        "KOWALSKI__ingester__metrics_port": str(free_port()),
    }
    text = report(build_config([], env))
    assert "API: NOT ANSWERING" in text and "ingester: NOT ANSWERING" in text, text
    assert "ingester metrics: unavailable" in text


def exported_families() -> set[str]:
    """Every metric family name Kowalski registers (the sampled gauges included)."""
    from prometheus_client import REGISTRY

    import ingester.endpoint  # noqa: F401  (its gauges register when serving)
    from kowalski import metrics

    names = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in REGISTRY.collect()
        if family.name.startswith("kowalski_")
    }
    return (
        names
        | {
            "kowalski_skyportal_outbox_pending",
            "kowalski_skyportal_outbox_oldest_seconds",
            "kowalski_dask_workers",
        }
        | set(metrics._sampled)
    )


def test_readme_lists_every_metric_and_the_dashboard_uses_only_them() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Operations: metrics") : readme.index("## Deployment")]
    listed = set(re.findall(r"^\| `(kowalski_[a-z_]+)` \|", section, re.M))
    assert listed == exported_families()
    dashboard = (ROOT / "ops/metrics/grafana/dashboards/kowalski.json").read_text()
    used = {
        re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"kowalski_[a-z_]+", dashboard)
    }
    assert used <= listed, used - listed
