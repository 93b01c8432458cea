"""/api/classifications in-process: merge, read, delete labels."""

from __future__ import annotations

from .apiclient import AppApi, loads


async def test_classifications(api: AppApi, users: dict[str, str]) -> None:
    admin = users["admin"]
    r = await api.call(
        "PUT",
        "/api/classifications/ztf",
        admin,
        json={"1127561445515015011": {"human_labels": {"Ia": 0.8, "Ib": 0.1}}},
    )
    assert r.status_code == 200, r.text
    await api.call(
        "PUT",
        "/api/classifications/ztf",
        admin,
        json={"1127561445515015011": {"human_labels": {"Ia": 0.2, "Ic": 0.7}}},
    )
    got = loads(
        await api.call("GET", "/api/classifications/ztf/1127561445515015011", users["public"])
    )["data"]
    assert (
        got["human_labels"] == {"Ia": 0.2, "Ib": 0.1, "Ic": 0.7}
        and got["objectId"] == "ZTF20aajcbhr"
    )
    await api.call(
        "DELETE",
        "/api/classifications/ztf",
        admin,
        json={"1127561445515015011": {"human_labels": ["Ia", "Ic"]}},
    )
    got = loads(
        await api.call("GET", "/api/classifications/ztf/1127561445515015011", users["public"])
    )["data"]
    assert got["human_labels"] == {"Ib": 0.1}
    missing = await api.call(
        "PUT", "/api/classifications/ztf", admin, json={"1": {"human_labels": ["Ia"]}}
    )
    assert missing.status_code == 404 and "candids not found" in missing.json()["message"]
