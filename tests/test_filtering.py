"""kowalski/filtering.py: the upstream stages join only the history a user's pipeline can read,
with the same answers as the whole join (real ZTF packets, the benchmark's 25 filters)."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from bench.nightdata import filter_pipelines
from ingester.pipeline import Packet, Pipeline
from kowalski.config import FILTER_HISTORY, FILTER_MATCH, Config, build_config
from kowalski.filtering import fields_read, full_pipeline, stage, upstream_stages
from kowalski.surveys import SURVEYS

from .conftest import ZTF_ALERTS

Doc = dict[str, Any]
HISTORY = frozenset({"prv_candidates", "fp_hists", "cross_matches"})
PERMISSIONS = [1, 2, 3]


@pytest.mark.parametrize(
    ("pipeline", "read"),
    [
        ([{"$project": {"candid": 1}}], set()),
        (
            [{"$match": {"cross_matches.Gaia_EDR3": {"$size": 0}}}, {"$project": {"x": 1}}],
            {"cross_matches"},
        ),
        (
            [{"$addFields": {"n": {"$size": "$prv_candidates"}}}, {"$project": {"n": 1}}],
            {"prv_candidates"},
        ),
        ([{"$project": {"candid": 1, "f": {"$getField": "fp_hists"}}}], {"fp_hists"}),
        # the output carries every field: no stage reshapes the document
        ([{"$match": {"candidate.drb": {"$gt": 0.5}}}], HISTORY),
        ([{"$project": {"cutoutScience": 0}}], HISTORY),
        ([{"$unset": "prv_candidates"}], HISTORY),
        # the whole document, named as a variable
        ([{"$project": {"candid": 1, "all": "$$ROOT"}}], HISTORY),
        ([{"$replaceWith": {"doc": "$$CURRENT"}}], HISTORY),
        # each $facet branch counts on its own
        ([{"$facet": {"a": [{"$project": {"candid": 1}}], "b": [{"$match": {"x": 1}}]}}], HISTORY),
        (
            [{"$facet": {"a": [{"$project": {"candid": 1}}], "b": [{"$count": "n"}]}}],
            set(),
        ),
        ([{"$group": {"_id": "$objectId", "n": {"$sum": 1}}}], set()),
    ],
)
def test_fields_read(pipeline: list[Doc], read: set[str]) -> None:
    assert fields_read(pipeline, HISTORY) == read


def whole_join(cfg: Config, pipeline: list[Doc], candids: list[int]) -> list[Doc]:
    """The pipeline as run before: every upstream stage, the whole history joined."""
    stages = upstream_stages(cfg, "ZTF_alerts", PERMISSIONS)
    stage(cfg, "ZTF_alerts", stages, FILTER_MATCH)["$match"]["candid"] = {"$in": candids}
    return [*stages, *copy.deepcopy(pipeline)]


def test_a_filter_reading_no_history_joins_none(cfg: Config) -> None:
    joined = full_pipeline(cfg, "ZTF_alerts", PERMISSIONS, [{"$project": {"candid": 1}}], [1])
    assert not any("$lookup" in s for s in joined)
    index = cfg.database.filter_stage_index("ZTF_alerts", FILTER_HISTORY) - 1  # no $lookup
    history = joined[index]["$project"]
    assert "candidate" in history and not HISTORY & set(history)
    reads: list[Doc] = [
        {"$match": {"cross_matches.Gaia_EDR3": {"$size": 0}}},
        {"$project": {"candid": 1}},
    ]
    (lookup,) = [
        s["$lookup"]
        for s in full_pipeline(cfg, "ZTF_alerts", PERMISSIONS, reads, [1])
        if "$lookup" in s
    ]
    assert lookup["pipeline"] == [{"$project": {"cross_matches": 1}}]


async def test_answers_equal_those_of_the_whole_join(
    test_environ: dict[str, str], mongo: AsyncMongoClient[Doc]
) -> None:
    """The benchmark's 25 filters (and their shared `$facet` run) over real ZTF alerts with
    history and ML scores: the same output documents with and without the trimmed join."""
    cfg = build_config(
        [], {**test_environ, "KOWALSKI__database__db": f"filtering_{uuid.uuid4().hex[:8]}"}
    )
    db = mongo[cfg.database.db]
    files = sorted(ZTF_ALERTS.rglob("*.avro"))
    packets = [Packet("t", 0, i, f.read_bytes()) for i, f in enumerate(files)]
    await Pipeline(cfg, db, {}).process(SURVEYS["ZTF"], packets)
    candids = [int(d["candid"]) for d in await db["ZTF_alerts"].find({}, {"candid": 1}).to_list()]
    pipelines = filter_pipelines()
    facet = [{"$facet": {f"f{i}": p for i, p in enumerate(pipelines)}}]
    passing = 0
    for pipeline in [*pipelines, facet]:
        trimmed = full_pipeline(cfg, "ZTF_alerts", PERMISSIONS, pipeline, candids)
        got = await (await db["ZTF_alerts"].aggregate(trimmed)).to_list()
        want = await (
            await db["ZTF_alerts"].aggregate(whole_join(cfg, pipeline, candids))
        ).to_list()
        key = lambda d: str(d.get("candid"))  # noqa: E731
        assert sorted(got, key=key) == sorted(want, key=key), pipeline
        passing += bool(want) and pipeline is not facet
    assert passing >= 10  # most of the filters pass some of the real alerts
    await mongo.drop_database(cfg.database.db)
