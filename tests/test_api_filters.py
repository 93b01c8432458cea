"""/api/filters in-process: pipelines refused at save time (the lifecycle through penquins is in test_api_smoke.py)."""

from __future__ import annotations

from typing import Any

import pytest

from .apiclient import AppApi


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        ([{"$matc": {"candid": 1}}], "filter test run failed"),
        (
            [{"$lookup": {"from": "users", "localField": "a", "foreignField": "_id", "as": "u"}}],
            "forbidden stages",
        ),
        ([{"$match": {"$where": "sleep(100)"}}], "forbidden operators"),
        ([{"$merge": {"into": "x"}}], "forbidden stages"),
    ],
)
async def test_filter_pipelines_refused(
    api: AppApi, users: dict[str, str], pipeline: list[Any], message: str
) -> None:
    r = await api.call(
        "POST",
        "/api/filters",
        users["admin"],
        json={
            "group_id": 1,
            "filter_id": 9,
            "catalog": "ZTF_alerts",
            "permissions": [1],
            "pipeline": pipeline,
        },
    )
    assert r.status_code in (400, 403) and message in r.json()["message"]
