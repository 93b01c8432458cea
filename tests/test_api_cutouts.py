"""/api/cutouts in-process: PNG and FITS cutouts."""

from __future__ import annotations

import pytest

from .apiclient import AppApi


@pytest.mark.parametrize("cutout", ["science", "template", "difference"])
async def test_cutouts_png_and_fits(api: AppApi, users: dict[str, str], cutout: str) -> None:
    png = await api.call(
        "GET",
        f"/api/cutouts/ztf/1127561445515015011/{cutout}/png?cmap=viridis&interval=zscale",
        users["public"],
    )
    assert (
        png.status_code == 200
        and png.headers["Content-Type"] == "image/png"
        and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    )
    fits = await api.call(
        "GET", f"/api/cutouts/ztf/1127561445515015011/{cutout}/fits", users["public"]
    )
    assert fits.status_code == 200 and fits.content[:6] == b"SIMPLE"
    assert (
        ".fits" in fits.headers["Content-Disposition"]
        and ".gz" not in fits.headers["Content-Disposition"]
    )
    bad = await api.call(
        "GET", f"/api/cutouts/ztf/1127561445515015011/{cutout}/png?stretch=cubic", users["public"]
    )
    assert bad.status_code == 400 and "stretch must be one of" in bad.json()["message"]
