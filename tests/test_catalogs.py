"""Catalog ingestion on the real sample files, with upstream's counts as expectations."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

import pandas as pd
import pytest
from pymongo import MongoClient
from pymongo.database import Database

from api.app import app_factory
from kowalski.config import Config, build_config
from kowalski.coords import great_circle_distance
from ops.catalogs import surveys
from ops.catalogs.ingest import Columns, frame_chunks, ingest_chunks
from ops.catalogs.readers import read_chunks
from ops.catalogs.synthetic import generate

from .conftest import DATA, found

CATALOGS = DATA / "catalogs"
VLASS = CATALOGS / "CIRADA_VLASS1QL_table1_components_v1_head100.csv"
IGAPS = CATALOGS / "igaps-dr1-215a-small.fits.gz"
ZTF_DR5 = CATALOGS / "ztf_000250_zg_c01_q1_dr5.parquet"
PTF = CATALOGS / "PTF_d002867_f01_c01_sexcat_match.pytable"
ZTF_MATCH = sorted((CATALOGS / "ztf_matchfiles").glob("*.pytable"))
FEATURES = CATALOGS / "ztf_source_features" / "331_2_3_7.h5"
CLASSIFICATIONS = CATALOGS / "ztf_source_classifications" / "xgb" / "d15.e.c" / "487_12_1_17.h5"


class Quiet(TypedDict):
    progress: bool


QUIET: Quiet = {"progress": False}


@pytest.fixture
def catalog_cfg(test_environ: dict[str, str]) -> Config:
    """A database of its own per test: no test sees what another one ingested."""
    return build_config(
        [], {**test_environ, "KOWALSKI__database__db": f"catalogs_{uuid.uuid4().hex[:8]}"}
    )


@pytest.fixture
def db(mongo_uri: str, catalog_cfg: Config) -> Iterator[Database[dict[str, Any]]]:
    with MongoClient[dict[str, Any]](mongo_uri) as client:
        yield client[catalog_cfg.database.db]
        client.drop_database(catalog_cfg.database.db)


def test_vlass(db: Database[dict[str, Any]]) -> None:
    [report] = surveys.vlass(db, VLASS, **QUIET)
    assert (report.read, report.ingested, db.VLASS_DR1.count_documents({})) == (27, 27, 27)
    doc = found(db.VLASS_DR1.find_one())
    assert doc["coordinates"]["radec_geojson"]["coordinates"][0] == pytest.approx(doc["RA"] - 180)


def test_igaps(db: Database[dict[str, Any]]) -> None:
    surveys.igaps(db, IGAPS, **QUIET)
    assert db.IGAPS_DR2.count_documents({}) == 100


def test_ztf_public_light_curves(db: Database[dict[str, Any]]) -> None:
    surveys.ztf_public(db, ZTF_DR5, **QUIET)
    assert db.ZTF_public_sources_DR5.count_documents({}) == 5449
    doc = found(db.ZTF_public_sources_DR5.find_one({"_id": 250101100000002}))
    assert doc["nepochs"] == len(doc["hmjd"]) == len(doc["mag"]) == 96


def test_ptf_matchfiles(db: Database[dict[str, Any]]) -> None:
    surveys.ptf_matchfiles(db, [PTF], **QUIET)
    assert db.PTF_sources.count_documents({}) == 1145
    assert db.PTF_exposures.count_documents({}) == 2
    doc = found(db.PTF_sources.find_one())
    assert len(doc["data"]) == doc["nobs"] > 0


def test_ztf_matchfiles(db: Database[dict[str, Any]]) -> None:
    surveys.ztf_matchfiles(db, ZTF_MATCH, **QUIET)
    assert db.ZTF_sources_20210401.count_documents({}) == 16
    assert db.ZTF_exposures_20210401.count_documents({}) == 10


def test_ztf_source_features_and_classifications(db: Database[dict[str, Any]]) -> None:
    surveys.ztf_source_features(db, FEATURES, **QUIET)
    assert db.ZTF_source_features_DR5.count_documents({}) == 123
    surveys.ztf_source_classifications(db, CLASSIFICATIONS, **QUIET)
    assert db.ZTF_source_classifications_DR5.count_documents({}) == 9875
    assert "d15_xgb" in found(db.ZTF_source_classifications_DR5.find_one())


def test_ingesting_twice_adds_nothing(db: Database[dict[str, Any]]) -> None:
    [first] = surveys.igaps(db, IGAPS, **QUIET)
    assert first.ingested == first.new == 100
    [again] = surveys.igaps(db, IGAPS, **QUIET)
    assert again.ingested == 100 and again.new == 0
    assert db.IGAPS_DR2.count_documents({}) == 100


def test_bad_rows_are_reported_never_stored(db: Database[dict[str, Any]], tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(
        "name,ra,dec\n"
        "good1,10.5,20.25\n"
        "nan_ra,,20\n"
        "high_dec,10,95\n"
        "bad_ra,not-a-number,1\n"
        "sexagesimal,00:42:44.3,+41:16:09\n"
        ",10,10\n"
    )
    report = ingest_chunks(
        db, "bad_rows", read_chunks(path), Columns("ra", "dec", "name"), path.name, progress=False
    )
    assert report.read == 6 and report.ingested == 2
    assert report.rejected == {
        "missing or NaN coordinates": 1,
        "coordinates out of range": 1,
        "bad coordinates: cannot parse coordinate 'not-a-number'": 1,
        "missing id (name)": 1,
    }
    assert sorted(d["_id"] for d in db.bad_rows.find()) == ["good1", "sexagesimal"]
    m31 = found(db.bad_rows.find_one({"_id": "sexagesimal"}))
    assert m31["coordinates"]["radec_geojson"]["coordinates"] == pytest.approx(
        [10.684583 - 180, 41.269167], abs=1e-5
    )
    assert "rejected 1: coordinates out of range" in report.summary()


def test_resumes_after_an_interruption(db: Database[dict[str, Any]]) -> None:
    frame = generate(150, center=(150.0, 2.0), radius_deg=1.0, seed=3)
    assert len(frame) > 300

    class Interrupted(Exception):
        pass

    def crash_after_two(rows_done: int) -> None:
        if rows_done >= 200:
            raise Interrupted

    with pytest.raises(Interrupted):
        ingest_chunks(
            db,
            "resumable",
            frame_chunks(frame, 100),
            Columns("ra", "dec", "id", int),
            "synthetic:3",
            writers=1,
            progress=False,
            on_chunk=crash_after_two,
        )
    partial = db.resumable.count_documents({})
    assert 200 <= partial < len(frame)
    report = ingest_chunks(
        db,
        "resumable",
        frame_chunks(frame, 100),
        Columns("ra", "dec", "id", int),
        "synthetic:3",
        writers=1,
        progress=False,
    )
    assert report.skipped_resumed >= 200
    assert db.resumable.count_documents({}) == len(frame)


def test_synthetic_catalog_is_realistic() -> None:
    frame = generate(400, center=(30.0, -60.0), radius_deg=2.0, mag_limit=21, seed=1)
    area = 2 * math.pi * (1 - math.cos(math.radians(2.0))) * (180 / math.pi) ** 2
    assert len(frame) / area == pytest.approx(400, rel=0.1)
    assert great_circle_distance(30.0, -60.0, frame.ra, frame.dec).max() <= 2.0 + 1e-9
    faint, bright = (frame.mag > 20).sum(), (frame.mag < 19).sum()
    assert faint > bright  # counts grow toward the limit
    assert frame.synthetic.all()


async def test_api_cone_search_finds_ingested_sources(
    aiohttp_client: Any, catalog_cfg: Config, db: Database[dict[str, Any]]
) -> None:
    surveys.vlass(db, VLASS, **QUIET)
    client = await aiohttp_client(await app_factory(catalog_cfg))
    auth = await client.post("/api/auth", json={"username": "admin", "password": "admin"})
    token = (await auth.json())["token"]
    csv = pd.read_csv(VLASS)
    rows = csv[(csv.Duplicate_flag < 2) & (csv.Quality_flag == 0)].head(5)
    radec = {str(r.Component_name): [r.RA, r.DEC] for r in rows.itertuples()}
    response = await client.post(
        "/api/queries",
        headers={"Authorization": f"Bearer {token}"},
        json={
            "query_type": "cone_search",
            "query": {
                "object_coordinates": {
                    "cone_search_radius": 1,
                    "cone_search_unit": "arcsec",
                    "radec": radec,
                },
                "catalogs": {"VLASS_DR1": {"projection": {"_id": 1}}},
            },
        },
    )
    assert response.status == 200, await response.text()
    data = (await response.json())["data"]["VLASS_DR1"]
    for name in radec:
        key = name.replace(".", "_")
        assert [d["_id"] for d in data[key]] == [name]


def test_seed_command_loads_a_directory(
    tmp_path: Path, test_environ: dict[str, str], mongo_uri: str
) -> None:
    import shutil
    import subprocess
    import sys

    from kowalski.config import ROOT

    source = tmp_path / "catalogs"
    source.mkdir()
    shutil.copy(VLASS, source)
    shutil.copy(IGAPS, source)
    (source / "Gaia_DR2.dump.gz").write_bytes(b"not restored here")
    db_name = f"seed_{uuid.uuid4().hex[:8]}"
    env = {**test_environ, "KOWALSKI__database__db": db_name}
    for _ in range(2):  # seeding twice changes nothing
        result = subprocess.run(
            [sys.executable, str(ROOT / "kowalski.py"), "seed", str(source)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
    assert "-> VLASS_DR1: read 27, ingested 27 (0 new), rejected 0" in result.stdout
    assert "Gaia_DR2.dump.gz: " in result.stdout  # restored, or a clear note why not
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    assert client[db_name].VLASS_DR1.count_documents({}) == 27
    assert client[db_name].IGAPS_DR2.count_documents({}) == 100
    client.close()
