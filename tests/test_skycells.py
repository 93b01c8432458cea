"""Sky cells: exact cone searches (against a haversine brute force) with and without the cell
pre-selection, and `seed --index-cells` adding cells in place."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pymongo import AsyncMongoClient, MongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.database import Database

from kowalski import cones
from kowalski.coords import great_circle_distance
from kowalski.skycells import (
    CELL_FIELD,
    CELL_ORDER,
    cone_ranges,
    cover_order,
    merge_ranges,
    sky_cell,
    sky_cells,
)
from ops.catalogs.ingest import Columns, frame_chunks, ingest_chunks
from ops.seed import index_cells

from .conftest import found

ARCSEC = 1 / 3600
RADII_DEG = [1 * ARCSEC, 2 * ARCSEC, 10 * ARCSEC, 1 / 60, 10 / 60, 1.0]
CENTERS = [
    (0.0, 90.0),
    (123.4, -90.0),
    (17.0, 89.9995),
    (200.0, -89.7),
    (0.0, 0.0),
    (359.99995, 12.5),
    (0.00003, -33.0),
    (180.0, 45.0),
    (266.4, -29.0),
    (90.0, 0.5),
]
TOTAL_CELLS = 12 * 4**CELL_ORDER


def offsets(
    center: tuple[float, float], max_sep_deg: float, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`n` random points within `max_sep_deg` of `center` (any bearing), in degrees."""
    ra0, dec0 = np.radians(center[0]), np.radians(center[1])
    sep = np.radians(max_sep_deg) * np.sqrt(rng.uniform(0, 1, n))
    bearing = rng.uniform(0, 2 * math.pi, n)
    dec = np.arcsin(np.sin(dec0) * np.cos(sep) + np.cos(dec0) * np.sin(sep) * np.cos(bearing))
    ra = ra0 + np.arctan2(
        np.sin(bearing) * np.sin(sep) * np.cos(dec0), np.cos(sep) - np.sin(dec0) * np.sin(dec)
    )
    return np.degrees(ra) % 360.0, np.degrees(dec)


def random_catalog(seed: int = 7) -> pd.DataFrame:
    """Uniform all-sky points plus, around every test center, points at up to twice each radius."""
    rng = np.random.default_rng(seed)
    ras = [rng.uniform(0, 360, 1500)]
    decs = [np.degrees(np.arcsin(rng.uniform(-1, 1, 1500)))]
    for center in CENTERS:
        for radius in RADII_DEG:
            ra, dec = offsets(center, 2 * radius, 12, rng)
            ras.append(ra)
            decs.append(dec)
    ra, dec = np.concatenate(ras), np.concatenate(decs)
    return pd.DataFrame({"id": np.arange(len(ra)), "ra": ra, "dec": dec})


def brute_force(
    catalog: pd.DataFrame, center: tuple[float, float], radius_deg: float
) -> tuple[set[int], set[int]]:
    """(ids inside the cone, ids so close to its edge that rounding may decide either way)."""
    sep = great_circle_distance(center[0], center[1], catalog["ra"], catalog["dec"])
    edge = np.abs(sep - radius_deg) <= radius_deg * 1e-7
    ids = catalog["id"].to_numpy()
    return set(ids[(sep <= radius_deg) & ~edge].tolist()), set(ids[edge].tolist())


def load(db: Database[dict[str, Any]], name: str, catalog: pd.DataFrame) -> None:
    ingest_chunks(
        db, name, frame_chunks(catalog, 500), Columns("ra", "dec", "id"), name, progress=False
    )


def strip_cells(db: Database[dict[str, Any]], name: str) -> None:
    """The same catalog as an upstream dump would restore it: no cells, no cell index."""
    db[name].drop_index("coordinates_cell")
    db[name].update_many({}, {"$unset": {CELL_FIELD: ""}})


async def cone_ids(
    coll: AsyncCollection[dict[str, Any]], centers: list[tuple[float, float]], radius_deg: float
) -> list[set[Any]]:
    async def find(query: dict[str, Any], sort: cones.Sort | None) -> list[dict[str, Any]]:
        return await coll.find(query, {"coordinates.radec_geojson": 1}, sort=sort).to_list()

    cells = await cones.has_cells(coll)
    found = await cones.search(find, centers, math.radians(radius_deg), None, cells)
    return [{doc["_id"] for doc, _ in matches} for matches in found]


async def assert_exact(
    coll: AsyncCollection[dict[str, Any]], catalog: pd.DataFrame, alone: bool = True
) -> int:
    """Every (center, radius) cone equals the brute force, asked all centers in one query and
    (`alone`) one cone at a time; returns the total number of hits."""
    hits = 0
    for radius in RADII_DEG:
        together = await cone_ids(coll, CENTERS, radius)
        for center, got in zip(CENTERS, together, strict=True):
            want, edge = brute_force(catalog, center, radius)
            assert got - edge == want, (center, radius * 3600)
            if alone:
                [single] = await cone_ids(coll, [center], radius)
                assert single - edge == want, (center, radius * 3600)
            hits += len(want)
    return hits


@pytest.fixture(scope="module")
def catalog() -> pd.DataFrame:
    return random_catalog()


@pytest.fixture(scope="module")
def sync_db(mongo_uri: str) -> Iterator[Database[dict[str, Any]]]:
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    name = f"cells_{uuid.uuid4().hex[:8]}"
    yield client[name]
    client.drop_database(name)
    client.close()


@pytest.fixture
async def async_db(
    mongo: AsyncMongoClient[dict[str, Any]], sync_db: Database[dict[str, Any]]
) -> Any:
    cones.forget_cell_checks()
    return mongo[sync_db.name]


# ---------------------------------------------------------------- the cell module alone


def test_cells_are_int64_nested_order_29() -> None:
    cells = sky_cells([0.0, 359.9999999, 180.0, 45.0], [90.0, -90.0, 0.0, 41.8])
    assert cells.dtype == np.int64
    assert ((cells >= 0) & (cells < TOTAL_CELLS)).all()
    assert sky_cell(360.0, 10.0) == sky_cell(0.0, 10.0)
    # nested: the order-0 base cell is the top 4 bits of the 2*29+4 bit index
    assert int(sky_cell(45.0, 41.8)) >> (2 * CELL_ORDER) == 0
    assert sky_cells([], []).size == 0


def test_cover_order_follows_the_radius_and_ranges_merge() -> None:
    orders = [cover_order(math.radians(r)) for r in RADII_DEG]
    assert orders == sorted(orders, reverse=True)
    assert orders[-1] >= 0 and orders[0] <= CELL_ORDER - 2
    assert merge_ranges([(10, 19), (0, 9), (30, 40), (35, 50)]) == [(0, 19), (30, 50)]


def test_cone_ranges_contain_every_point_of_the_cone() -> None:
    rng = np.random.default_rng(3)
    centers = CENTERS + [
        (float(rng.uniform(0, 360)), float(np.degrees(np.arcsin(rng.uniform(-1, 1)))))
        for _ in range(40)
    ]
    for center in centers:
        for radius in RADII_DEG:
            ranges = cone_ranges(*center, math.radians(radius))
            assert 1 <= len(ranges) <= 8
            ra, dec = offsets(center, radius * 0.999999, 200, rng)
            cells = sky_cells(ra, dec)
            lows = np.array([low for low, _ in ranges])
            highs = np.array([high for _, high in ranges])
            inside = ((cells[:, None] >= lows) & (cells[:, None] <= highs)).any(axis=1)
            assert inside.all(), (center, radius * 3600)


def test_whole_sky_cone_is_one_range() -> None:
    assert cone_ranges(10.0, 10.0, math.pi) == [(0, TOTAL_CELLS - 1)]


# ---------------------------------------------------------------- against the database


@pytest.mark.timeout(900)
async def test_cone_search_with_cells_equals_brute_force(
    sync_db: Database[dict[str, Any]], async_db: Any, catalog: pd.DataFrame
) -> None:
    load(sync_db, "with_cells", catalog)
    doc = found(sync_db.with_cells.find_one({"_id": 5}))
    ra, dec = (float(x) for x in catalog.loc[5, ["ra", "dec"]].to_numpy(dtype=float))
    assert doc["coordinates"]["cell"] == sky_cell(ra, dec)
    coll = async_db.with_cells
    assert await cones.has_cells(coll)
    assert await assert_exact(coll, catalog) > 200


@pytest.mark.timeout(900)  # secantusd-py evaluates `$or` slowly
async def test_catalog_without_cells_still_answers_and_index_cells_adds_them(
    sync_db: Database[dict[str, Any]], async_db: Any, catalog: pd.DataFrame
) -> None:
    load(sync_db, "no_cells", catalog)
    strip_cells(sync_db, "no_cells")
    coll = async_db.no_cells
    assert not await cones.has_cells(coll)
    hits = await assert_exact(coll, catalog, alone=False)

    # an index over documents still lacking their cell is not trusted
    sync_db.no_cells.create_index([(CELL_FIELD, 1)], name="coordinates_cell")
    cones.forget_cell_checks()
    assert not await cones.has_cells(coll)

    assert index_cells(sync_db.no_cells, batch=700, progress=False) == len(catalog)
    assert sync_db.no_cells.count_documents({CELL_FIELD: {"$exists": False}}) == 0
    assert index_cells(sync_db.no_cells, progress=False) == 0  # idempotent
    cones.forget_cell_checks()
    assert await cones.has_cells(coll)
    assert await assert_exact(coll, catalog, alone=False) == hits


async def test_cone_queries_with_cells_ask_for_the_cell_index_order(
    sync_db: Database[dict[str, Any]], async_db: Any, catalog: pd.DataFrame
) -> None:
    """With cells, every chunk's query asks for the cell index's order (secantusd-rs spent ~15x
    more per document on an `$or` of many ranges in its default order; README), without cells no
    order; the documents are the same either way."""
    load(sync_db, "ordered", catalog)
    coll = async_db.ordered
    asked: list[cones.Sort | None] = []
    answers: list[list[Any]] = []

    async def find(query: dict[str, Any], sort: cones.Sort | None) -> list[dict[str, Any]]:
        asked.append(sort)
        projection = {"coordinates.radec_geojson": 1, CELL_FIELD: 1}
        docs: list[dict[str, Any]] = await coll.find(query, projection, sort=sort).to_list()
        answers.append([doc["coordinates"]["cell"] for doc in docs])
        return docs

    centers = CENTERS * 8  # two chunks: 64 cones and 16
    radius = math.radians(10 / 60)
    with_order = await cones.search(find, centers, radius, None, cells=True)
    assert asked == [cones.CELL_SORT] * 2
    assert all(cells == sorted(cells) and cells for cells in answers)
    asked.clear()
    without = await cones.search(find, centers, radius, None, cells=False)
    assert asked == [None] * 2

    def ids(found: list[list[tuple[dict[str, Any], float]]]) -> list[set[Any]]:
        return [{doc["_id"] for doc, _ in matches} for matches in found]

    assert ids(with_order) == ids(without)
