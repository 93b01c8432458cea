"""The one name for a document as Python holds it (BSON from the database, JSON on the wire, a
decoded Avro record) and the one clock for stored timestamps."""

from __future__ import annotations

import datetime as dt
from typing import Any

Doc = dict[str, Any]


def utcnow() -> dt.datetime:
    """Now in UTC, naive: how the database clients (tz_aware=False) store and return datetimes."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)
