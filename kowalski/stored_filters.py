"""The filter document as it is stored in the `filters` collection (upstream's shape): one type
for the API that writes it, the ingester and the back-fills that read it, and the tests and the
bench that put filters in place without the API.

A filter holds its versions in `fv` (each with its `fid` and the pipeline as JSON text, as
upstream stores it); `active_fid` names the one that runs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, NotRequired, TypedDict

from bson import json_util

from kowalski.documents import Doc


class FilterVersion(TypedDict):
    fid: str
    pipeline: str  # the pipeline as JSON text
    created_at: NotRequired[dt.datetime]


class StoredFilter(TypedDict):
    group_id: int
    filter_id: int
    catalog: str
    permissions: list[int]
    active: bool
    active_fid: str
    fv: list[FilterVersion]
    autosave: Any  # false, true, or {active, comment, pipeline, ...}
    auto_followup: Doc
    update_annotations: NotRequired[bool]
    stream: NotRequired[bool | dict[str, bool]]
    created_at: NotRequired[dt.datetime]
    last_modified: NotRequired[dt.datetime]


def new_version(fid: str, pipeline: Sequence[Any], at: dt.datetime | None = None) -> FilterVersion:
    """A version running `pipeline` (stored as Extended JSON text, as upstream)."""
    version = FilterVersion(fid=fid, pipeline=json_util.dumps(list(pipeline)))
    if at is not None:
        version["created_at"] = at
    return version


def new_filter(
    filter_id: int,
    group_id: int,
    catalog: str,
    permissions: Sequence[int],
    version: FilterVersion,
    *,
    active: bool = True,
    autosave: Any = False,
    auto_followup: Doc | None = None,
) -> StoredFilter:
    """A filter whose only (and active) version is `version`."""
    return StoredFilter(
        group_id=group_id,
        filter_id=filter_id,
        catalog=catalog,
        permissions=list(permissions),
        active=active,
        active_fid=version["fid"],
        fv=[version],
        autosave=autosave,
        auto_followup=auto_followup or {},
    )


def find_version(doc: Mapping[str, Any], fid: str | None = None) -> Mapping[str, Any] | None:
    """Version `fid` of a stored filter (by default its active one), or None."""
    wanted = fid if fid is not None else doc.get("active_fid")
    return next((v for v in doc.get("fv", []) if v.get("fid") == wanted), None)
