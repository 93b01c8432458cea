"""The broker feed as `up --local` runs it: `python -m ingester` with every survey of the registry
(`--survey=` each, as ops/local.py starts it), bundled schemas (no registry), the broker on,
against an in-test SkyPortal named the way upstream's brokers accept ("WINTER" for WNTR, "PGIR",
"TURBO", ZTF's three streams, "LSST") and without a DECam instrument. Every real packet of every
survey is replayed: the archive holds every alert, each fed survey's passing alerts are posted
with their instrument and stream, DECam waits with its reason (entries pending, feed status says
why), and nothing is written twice."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from ingester.replay import replay
from kowalski.config import ROOT, build_config
from kowalski.surveys import SURVEYS
from kowalski.testing.filters import filter_document
from ops.local import bundled_alerts

from . import test_skyportal
from .fake_skyportal import TOKEN, FakeSkyPortal
from .test_ingestion import EXPECTED, night_environ
from .test_skyportal import assert_each_entry_delivered_once, wait_for

Doc = dict[str, Any]
skyportal = test_skyportal.skyportal  # the fixture
INSTRUMENTS = {"ZTF": 7, "PGIR": 8, "WINTER": 9, "TURBO": 10, "LSST": 11}  # no DECam
STREAMS = {"PGIR": 21, "WINTER": 22, "TURBO": 23, "LSST": 24}  # upstream's names
FED = {"ZTF": "ZTF", "PGIR": "PGIR", "WNTR": "WINTER", "TURBO": "TURBO", "LSST": "LSST"}


@pytest.mark.timeout(1200)
def test_every_survey_is_archived_and_fed_as_up_local_runs_it(
    test_environ: dict[str, str],
    kafka_bootstrap: str,
    mongo_uri: str,
    skyportal: FakeSkyPortal,
    tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex[:8]
    env = {
        **night_environ(test_environ, kafka_bootstrap, tag),
        "KOWALSKI__kafka__topics__LSST": f"^lsst-alerts-v[0-9]+_{tag}$",
        "KOWALSKI__kafka__topics__DECAM": f"^decam_[0-9]{{8}}_{tag}$",
        "KOWALSKI__kafka__schema_registry_url": "null",
        "KOWALSKI__misc__broker": "true",
        "KOWALSKI__skyportal__port": str(skyportal.port),
        "KOWALSKI__skyportal__backoff_s": "0.2",
        "KOWALSKI__skyportal__max_backoff_s": "2",
        "KOWALSKI__skyportal__poll_s": "0.2",
        "SKYPORTAL_TOKEN": TOKEN,
    }
    cfg = build_config([], env)
    skyportal.state.instruments = [{"id": i, "name": n} for n, i in INSTRUMENTS.items()]
    skyportal.state.streams += [{"id": i, "name": n} for n, i in STREAMS.items()]
    client: MongoClient[Doc] = MongoClient(mongo_uri)
    db = client[cfg.database.db]
    collections = {name: s.alerts_collection(cfg) for name, s in SURVEYS.items()}
    for number, (name, collection) in enumerate(sorted(collections.items()), start=1):
        skyportal.add_group(100 + number, f"group {name}", {number: f"all {name}"})
        db.filters.insert_one(
            filter_document(
                number, [{"$project": {"candid": 1}}], catalog=collection, autosave=True
            )
        )
    replay(kafka_bootstrap, bundled_alerts(), suffix=f"_{tag}", progress=False)
    log = (tmp_path / "ingester.log").open("w")
    surveys = [f"--survey={s}" for s in SURVEYS]  # as ops/local.py starts it
    ingester = subprocess.Popen(
        [sys.executable, "-m", "ingester", *surveys],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        expected = {c: n for c, n in EXPECTED.items() if not c.endswith("_aux")}
        wait_for(
            lambda: (
                all(db[c].count_documents({}) == n for c, n in expected.items())
                and db.LSST_alerts.count_documents({}) > 0
                and db.DECAM_alerts.count_documents({}) > 0
            ),
            timeout=600,
            why=lambda: {c: db[c].count_documents({}) for c in collections.values()},
        )
        fed = [collections[s] for s in FED]
        archived = sum(db[c].count_documents({}) for c in fed)

        def posted() -> int:
            return sum(len(v) for v in skyportal.state.candidates.values())

        wait_for(
            lambda: (
                posted() == archived
                and db.skyportal_outbox.count_documents(
                    {"state": "pending", "survey": {"$ne": "DECAM"}}
                )
                == 0
            ),
            timeout=600,
            why=lambda: (posted(), archived, list(db.skyportal_outbox.find({"state": "failed"}))),
        )
        wait_for(
            lambda: db.skyportal_setup.count_documents({"_id": "DECAM", "state": "waiting"}) == 1,
            timeout=600,
            why=lambda: list(db.skyportal_setup.find()),
        )
    finally:
        ingester.send_signal(signal.SIGTERM)
        ingester.wait(timeout=180)
        log.close()
    output = (tmp_path / "ingester.log").read_text()
    assert ingester.returncode == 0, output[-3000:]
    assert "DECAM waits: SkyPortal at http://" in output

    # the archive holds every alert of every survey, the feed's or not
    assert db.dead_letters.count_documents({}) == 0
    # each fed survey's alerts are candidates, with photometry on its instrument and stream
    puts = [r.body for r in skyportal.processed("PUT") if r.path == "/api/photometry"]
    for name, instrument in FED.items():
        objects = {str(o) for o in db[collections[name]].distinct(SURVEYS[name].object_key)}
        assert objects <= set(skyportal.state.candidates), name
        mine = [b for b in puts if b["obj_id"] in objects]
        assert mine and {b["instrument_id"] for b in mine} == {INSTRUMENTS[instrument]}, name
        if name != "ZTF":
            assert {tuple(b["stream_ids"]) for b in mine} == {(STREAMS[instrument],)}, name
    lsst = [b for b in puts if b["instrument_id"] == INSTRUMENTS["LSST"]]
    assert all(zp == 31.4 for b in lsst for zp in b["zp"])
    assert {f for b in lsst for f in b["filter"]} <= {f"lsst{b}" for b in "ugrizy"}
    # DECam waits: its entries are pending, none was sent, and feed status says why
    assert db.skyportal_outbox.count_documents({"survey": "DECAM", "state": "pending"}) > 0
    decam = {str(o) for o in db.DECAM_alerts.distinct("objectId")}
    assert not decam & set(skyportal.state.candidates)
    status = subprocess.run(
        [sys.executable, str(ROOT / "kowalski.py"), "feed", "status"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    assert "DECAM: WAITING: SkyPortal at http://" in status.stdout
    assert "no instrument named 'DECam'" in status.stdout
    assert "WNTR: ready" in status.stdout and "LSST: ready" in status.stdout
    # nothing written twice (DECam's pending entries aside)
    db.skyportal_outbox.delete_many({"survey": "DECAM"})
    assert_each_entry_delivered_once(db, skyportal)
    client.drop_database(cfg.database.db)
    client.close()
