"""Filter documents as the API stores them (`filters` collection), for tests and benchmarks that
put filters in place without going through the API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kowalski.documents import Doc
from kowalski.stored_filters import new_filter, new_version


def filter_document(
    filter_id: int,
    pipeline: Sequence[Any],
    *,
    group_id: int | None = None,
    catalog: str = "ZTF_alerts",
    permissions: Sequence[int] = (1, 2, 3),
    fid: str | None = None,
    active: bool = True,
    **options: Any,
) -> Doc:
    """An active filter with one version (`fid`, default `v<filter_id>`) running `pipeline`;
    `group_id` defaults to `100 + filter_id`; `options` set or override any other field
    (`autosave`, `auto_followup`, `update_annotations`, `stream`, ...)."""
    document: Doc = {
        **new_filter(
            filter_id,
            100 + filter_id if group_id is None else group_id,
            catalog,
            permissions,
            new_version(fid or f"v{filter_id}", pipeline),
            active=active,
        ),
        **options,
    }
    return document
