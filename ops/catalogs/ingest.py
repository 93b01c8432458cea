"""Generic catalog ingestion: tables (pandas chunks) -> documents with `coordinates`
(`radec_geojson` [ra-180, dec] for the 2dsphere index, `radec_str`, the sky `cell` for its B-tree
index) -> bulk upserts by `_id`.

- Bad rows (missing/NaN/out-of-range coordinates, unparsable values, missing id) are counted with
  their reason and never stored.
- Idempotent: documents are upserted by `_id`, so ingesting a file twice adds nothing.
- Resumable: progress is checkpointed per chunk in `catalog_ingestions`; a rerun skips the chunks
  already written.
- Parallel: chunks are written by a small pool of threads while the next chunk is prepared.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pymongo import ReplaceOne, UpdateOne
from pymongo.database import Database
from tqdm import tqdm

from kowalski.coords import deg_to_dms, deg_to_hms, geojson_point, parse_dec, parse_ra
from kowalski.db import IndexKeys, create_index_sync
from kowalski.documents import Doc, utcnow
from kowalski.skycells import CELL_INDEX, CELL_INDEX_NAME, add_cells

CHECKPOINTS = "catalog_ingestions"
GEO_INDEX: IndexKeys = [("coordinates.radec_geojson", "2dsphere"), ("_id", 1)]
EXAMPLES_KEPT = 5


@dataclass
class Report:
    """What an ingestion did: the final report printed to the operator."""

    collection: str
    source: str
    read: int = 0
    ingested: int = 0
    new: int = 0
    skipped_resumed: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def reject(self, reason: str, row: Any) -> None:
        self.rejected[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLES_KEPT:
            kept.append(str(row))

    def summary(self) -> str:
        lines = [
            f"{self.source} -> {self.collection}: read {self.read}, ingested {self.ingested} "
            f"({self.new} new), rejected {sum(self.rejected.values())}"
            + (
                f", skipped {self.skipped_resumed} already ingested (resumed)"
                if self.skipped_resumed
                else ""
            )
        ]
        for reason, count in self.rejected.most_common():
            lines.append(
                f"  rejected {count}: {reason} (e.g. rows {', '.join(self.examples[reason])})"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class Columns:
    """Which columns hold the id and the position. `id` None: a stable id from source + row."""

    ra: str | None
    dec: str | None
    id: str | None = None
    id_type: Callable[[Any], Any] | None = None


def plain(value: Any) -> Any:
    """numpy/pandas scalars and arrays -> BSON-encodable Python values; NaN -> None."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode(errors="replace").strip()
    if isinstance(value, np.generic):
        value = value.item()
    if value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    return value


def row_document(
    row: Mapping[Hashable, Any], columns: Columns, fallback_id: str
) -> tuple[Doc | None, str | None]:
    """(document, None) or (None, reason it was rejected)."""
    doc = {k: v for k, v in ((str(k), plain(v)) for k, v in row.items()) if v is not None}
    if columns.id:
        raw = doc.get(columns.id)
        if raw is None or raw == "":
            return None, f"missing id ({columns.id})"
        try:
            doc["_id"] = columns.id_type(raw) if columns.id_type else raw
        except (TypeError, ValueError):
            return None, f"bad id ({columns.id})"
    else:
        doc["_id"] = fallback_id
    if columns.ra is None or columns.dec is None:
        return doc, None
    ra_raw, dec_raw = doc.get(columns.ra), doc.get(columns.dec)
    if ra_raw is None or dec_raw is None:
        return None, "missing or NaN coordinates"
    try:
        ra, dec = parse_ra(ra_raw), parse_dec(dec_raw)
    except ValueError as exc:
        reason = str(exc).split(",")[0]
        return (
            None,
            "coordinates out of range"
            if "out of range" in reason
            else f"bad coordinates: {reason}",
        )
    doc["coordinates"] = {
        "radec_str": [deg_to_hms(ra), deg_to_dms(dec)],
        "radec_geojson": geojson_point(ra, dec),
    }
    return doc, None


def _write(db: Database[Doc], collection: str, docs: list[Doc], merge: bool) -> int:
    """Upsert a chunk; returns how many documents were new."""
    if not docs:
        return 0
    ops: list[Any] = [
        UpdateOne(
            {"_id": d["_id"]}, {"$set": {k: v for k, v in d.items() if k != "_id"}}, upsert=True
        )
        if merge
        else ReplaceOne({"_id": d["_id"]}, d, upsert=True)
        for d in docs
    ]
    result = db[collection].bulk_write(ops, ordered=False)
    return int(result.upserted_count)


def ingest_chunks(
    db: Database[Doc],
    collection: str,
    chunks: Iterable[pd.DataFrame],
    columns: Columns,
    source: str,
    total_rows: int | None = None,
    merge: bool = False,
    writers: int = 2,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
    prepare: Callable[[str], None] | None = None,
) -> Report:
    """Ingest table chunks into `collection`; returns the report. `merge` $sets fields into
    existing documents (several files contributing to one document) instead of replacing them."""
    report = Report(collection=collection, source=source)
    if prepare:
        prepare(collection)
    checkpoint_id = f"{collection}:{source}"
    checkpoints = db[CHECKPOINTS]
    state = checkpoints.find_one({"_id": checkpoint_id}) or {}
    resume_from = 0 if state.get("complete") else int(state.get("rows_done", 0))
    if columns.ra is not None:
        create_index_sync(db[collection], GEO_INDEX, "radec__id")
        create_index_sync(db[collection], CELL_INDEX, CELL_INDEX_NAME)
    bar = tqdm(total=total_rows, desc=f"ingesting {collection}", unit="row", disable=not progress)
    pending: list[tuple[Future[int], int, int]] = []

    def settle(wait_all: bool) -> None:
        while pending and (wait_all or pending[0][0].done() or len(pending) > writers):
            future, rows_done, count = pending.pop(0)
            report.new += future.result()
            report.ingested += count
            checkpoints.update_one(
                {"_id": checkpoint_id},
                {"$set": {"rows_done": rows_done, "complete": False, "updated_at": utcnow()}},
                upsert=True,
            )
            if on_chunk:
                on_chunk(rows_done)

    position = 0
    with ThreadPoolExecutor(max_workers=writers) as pool:
        for chunk in chunks:
            start, position = position, position + len(chunk)
            report.read += len(chunk)
            bar.update(len(chunk))
            if position <= resume_from:
                report.skipped_resumed += len(chunk)
                continue
            docs: list[Doc] = []
            for offset, row in enumerate(chunk.to_dict("records")):
                number = start + offset
                if number < resume_from:
                    report.skipped_resumed += 1
                    continue
                doc, reason = row_document(row, columns, f"{source}:{number}")
                if reason is not None:
                    report.reject(reason, number)
                elif doc is not None:
                    docs.append(doc)
            add_cells(docs)
            pending.append((pool.submit(_write, db, collection, docs, merge), position, len(docs)))
            settle(wait_all=False)
        settle(wait_all=True)
    bar.close()
    checkpoints.update_one(
        {"_id": checkpoint_id},
        {
            "$set": {
                "rows_done": position,
                "complete": True,
                "updated_at": utcnow(),
                "report": report.summary(),
            }
        },
        upsert=True,
    )
    return report


def frame_chunks(frame: pd.DataFrame, size: int) -> Iterator[pd.DataFrame]:
    for start in range(0, len(frame), size):
        yield frame.iloc[start : start + size]
