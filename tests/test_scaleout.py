"""Scale-out as deployed over several hosts, on this machine with separate OS processes: a `dask
scheduler`, two `dask worker`s, two ingesters (`python -m ingester`) in one consumer group over
4-partition topics of the real ZTF packets, a filter streaming its passes (the results stream).

Every wait is a condition with a generous deadline (the machine may be loaded)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from ingester.replay import messages_of, topic_for
from kowalski import results
from kowalski.config import ROOT, build_config
from kowalski.services.dask import ExternalCluster
from kowalski.services.kafka import create_topics, members_assigned, offsets_behind, produce_spread
from kowalski.services.process import start_process, stop_process
from kowalski.surveys import survey_of_path
from kowalski.testing.filters import filter_document

from .test_results import DRB, passed_by_filter_runs, read_all, results_env, ztf_packets

PARTITIONS = 4
DEADLINE_S = 360.0
PUBLISHED = re.compile(r"results: (\d+) record\(s\) published by (\S+)")
READY = re.compile(r"results: transactional producer (\S+) ready")


def messages_by_topic(files: list[Path], suffix: str) -> dict[str, list[bytes]]:
    """What `ingester.replay.replay` would produce, grouped by topic (in file order)."""
    by_topic: dict[str, list[bytes]] = {}
    for path in sorted(files):
        survey = survey_of_path(path)
        for message in messages_of(path.read_bytes(), survey):
            by_topic.setdefault(topic_for(message, survey, suffix), []).append(message)
    return by_topic


@pytest.fixture(scope="module")
def cluster(
    test_environ: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExternalCluster]:
    with ExternalCluster(tmp_path_factory.mktemp("dask"), test_environ) as external:
        yield external.start(workers=2)


def wait_for(
    condition: Callable[[], bool], what: Callable[[], str], procs: list[subprocess.Popen[bytes]]
) -> None:
    """Poll `condition` until true; fail at the deadline, or at once if an ingester that must
    live (listed in `procs`) exited."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead, f"exited while waiting ({what()}): {dead}"
        assert time.monotonic() < deadline, f"not within {DEADLINE_S:.0f} s: {what()}"
        time.sleep(1.0)


class Night:
    """Two ingester processes of one group over 4-partition topics, packets produced once both
    hold partitions (so both consume)."""

    def __init__(
        self, cluster: ExternalCluster, env: dict[str, str], bootstrap: str, tmp: Path
    ) -> None:
        tag = uuid.uuid4().hex[:8]
        self.env = results_env(
            {k: v for k, v in env.items() if not k.startswith("KOWALSKI_TEST")},
            bootstrap,
            tag,
            KOWALSKI__ingester__batch_size="2",
            KOWALSKI__dask__scheduler_address=cluster.address,
            PYTHONPATH=str(ROOT),
        )
        self.cfg = build_config([], self.env)
        self.bootstrap, self.tmp = bootstrap, tmp
        self.mongo: MongoClient[dict[str, Any]] = MongoClient(self.env["MONGODB_URI"])
        self.db = self.mongo[self.cfg.database.db]
        self.db.filters.insert_one(filter_document(1, DRB, stream=True))
        self.by_topic = messages_by_topic(ztf_packets(), f"_{tag}")
        create_topics(bootstrap, list(self.by_topic), PARTITIONS)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.state = "not started"

    def start_ingester(self, **extra: str) -> subprocess.Popen[bytes]:
        proc = start_process(
            [sys.executable, "-m", "ingester", "--survey", "ZTF"],
            self.log(len(self.procs)),
            cwd=ROOT,
            env={**self.env, **extra},
        )
        self.procs.append(proc)
        return proc

    def log(self, n: int) -> Path:
        return self.tmp / f"ingester-{n}.log"

    def produce_when_both_consume(self) -> None:
        wait_for(
            lambda: members_assigned(self.bootstrap, self.cfg.kafka.group, 2),
            lambda: "both ingesters holding partitions",
            self.procs,
        )
        produce_spread(self.bootstrap, self.by_topic, PARTITIONS)

    def alerts(self) -> int:
        return sum(len(m) for m in self.by_topic.values())

    def done(self) -> bool:
        """Every alert archived, every pass published (read_committed), offsets committed."""
        archived = self.db.ZTF_alerts.count_documents({})
        self.state = f"{archived} of {self.alerts()} alerts archived"
        if archived < self.alerts():
            return False
        passed = passed_by_filter_runs(self.db, 1)
        published = sorted(p.record["candid"] for p in self.published())
        self.state = f"{len(published)} published of {len(passed)} passes"
        if published != passed:
            return False
        behind = offsets_behind(self.bootstrap, self.cfg.kafka.group, list(self.by_topic))
        self.state = f"offsets behind: {behind}"
        return not behind

    def published(self) -> list[Any]:
        return read_all(self.bootstrap, results.topic_for(self.cfg, 1, "ZTF"))

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc, timeout=120)

    def logs(self) -> list[str]:
        return [self.log(n).read_text(errors="replace") for n in range(len(self.procs))]


@pytest.fixture
def night(
    cluster: ExternalCluster, test_environ: dict[str, str], kafka_bootstrap: str, tmp_path: Path
) -> Iterator[Night]:
    one = Night(cluster, test_environ, kafka_bootstrap, tmp_path)
    try:
        yield one
    finally:
        one.stop()
        one.mongo.close()


def assert_archived_and_published_once(night: Night) -> None:
    candids = night.db.ZTF_alerts.distinct("candid")
    assert night.db.ZTF_alerts.count_documents({}) == len(candids) == night.alerts()
    expected = passed_by_filter_runs(night.db, 1)
    published = sorted(p.record["candid"] for p in night.published())
    assert published == expected and len(expected) > 10


@pytest.mark.timeout(900)
def test_two_ingesters_of_one_group_on_one_host_both_publish_unfenced(night: Night) -> None:
    """Each process has a transactional id of its own (a slot per host): neither is fenced."""
    night.start_ingester()
    night.start_ingester()
    night.produce_when_both_consume()
    wait_for(night.done, lambda: night.state, night.procs)
    night.stop()
    logs = night.logs()
    assert [p.returncode for p in night.procs] == [0, 0], [log[-2000:] for log in logs]
    ids = [READY.findall(log) for log in logs]
    assert len({i for found in ids for i in found}) == 2, ids  # one id each, never shared
    published = [PUBLISHED.findall(log) for log in logs]
    assert all(found and int(found[-1][0]) > 0 for found in published), published
    assert not [log for log in logs if "fenced" in log.lower()]
    assert_archived_and_published_once(night)


@pytest.mark.timeout(900)
def test_survivor_takes_over_from_an_ingester_killed_mid_night(night: Night) -> None:
    """One ingester is SIGKILLed inside its first results transaction (produced, not committed):
    the other takes its partitions over and every alert is archived once, every pass published
    once, every offset committed."""
    victim = night.start_ingester(KOWALSKI_TEST_CRASH_AT="between_produce_and_commit")
    night.start_ingester()
    night.produce_when_both_consume()
    deadline = time.monotonic() + DEADLINE_S
    while victim.poll() is None:
        assert time.monotonic() < deadline, "the victim was never killed"
        time.sleep(1.0)
    assert victim.returncode == -9, night.logs()[0][-2000:]
    wait_for(night.done, lambda: night.state, night.procs[1:])
    night.stop()
    assert night.procs[1].returncode == 0, night.logs()[1][-3000:]
    assert_archived_and_published_once(night)
