"""The survey-specific ingesters upstream Kowalski ships, on top of the generic one:
VLASS, IGAPS, ZTF public light curves (DR), PTF and ZTF matchfiles, ZTF source features and
classifications (SCoPe)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pymongo.database import Database

from kowalski.documents import Doc
from ops.catalogs.ingest import Columns, Report, frame_chunks, ingest_chunks
from ops.catalogs.readers import CHUNK_ROWS, ReadError, count_rows, read_chunks, table_to_frame

ZTF_FILTERS = {"zg": 1, "zr": 2, "zi": 3}
MATCHFILE = re.compile(r"ztf_(\d{6})_(z[gri])_c(\d{2})_q(\d)_match", re.IGNORECASE)
PTF_MATCHFILE = re.compile(r"PTF_d(\d+)_f(\d+)_c(\d+)", re.IGNORECASE)


def vlass(db: Database[Doc], path: Path, collection: str = "VLASS_DR1", **kw: Any) -> list[Report]:
    """CIRADA VLASS QL components: only unique (Duplicate_flag < 2), good (Quality_flag == 0) ones."""

    def good(chunks: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for chunk in chunks:
            yield chunk[(chunk["Duplicate_flag"] < 2) & (chunk["Quality_flag"] == 0)]

    columns = Columns(ra="RA", dec="DEC", id="Component_name")
    return [ingest_chunks(db, collection, good(read_chunks(path)), columns, path.name, **kw)]


def igaps(db: Database[Doc], path: Path, collection: str = "IGAPS_DR2", **kw: Any) -> list[Report]:
    columns = Columns(ra="RA", dec="DEC", id="name")
    return [
        ingest_chunks(db, collection, read_chunks(path), columns, path.name, count_rows(path), **kw)
    ]


def ztf_public(
    db: Database[Doc], path: Path, collection: str = "ZTF_public_sources_DR5", **kw: Any
) -> list[Report]:
    """ZTF public data-release light curves (parquet): one document per object and filter."""
    columns = Columns(ra="objra", dec="objdec", id="objectid", id_type=int)
    return [
        ingest_chunks(db, collection, read_chunks(path), columns, path.name, count_rows(path), **kw)
    ]


def _with_light_curves(sources: pd.DataFrame, data: pd.DataFrame, key: str) -> pd.DataFrame:
    """Sources that have observations, each with its `data` points (as upstream stores them)."""
    grouped = {k: g.drop(columns=[key]).to_dict("records") for k, g in data.groupby(key)}
    kept = sources[sources["nobs"] > 0].copy()
    kept["data"] = pd.Series(
        [grouped.get(k, []) for k in kept[key]], index=kept.index, dtype=object
    )
    return kept


def _read_table(path: Path, key: str) -> pd.DataFrame:
    import tables

    with tables.open_file(path) as h5:
        return table_to_frame(h5.get_node(key).read())


def _ingest_matchfile(
    db: Database[Doc],
    path: Path,
    sources: pd.DataFrame,
    exposures: pd.DataFrame,
    collections: tuple[str, str],
    **kw: Any,
) -> list[Report]:
    """The two halves of a matchfile: sources (with light curves) and exposures."""
    return [
        ingest_chunks(
            db,
            collections[0],
            frame_chunks(sources, CHUNK_ROWS),
            Columns("ra", "dec", "_id"),
            path.name,
            len(sources),
            **kw,
        ),
        ingest_chunks(
            db,
            collections[1],
            frame_chunks(exposures, CHUNK_ROWS),
            Columns(None, None, "expid", int),
            f"{path.name}:exposures",
            len(exposures),
            **kw,
        ),
    ]


def ptf_matchfiles(
    db: Database[Doc],
    paths: list[Path],
    sources: str = "PTF_sources",
    exposures: str = "PTF_exposures",
    **kw: Any,
) -> list[Report]:
    reports = []
    for path in paths:
        match = PTF_MATCHFILE.search(path.name)
        if not match:
            raise ReadError(f"{path.name}: not a PTF matchfile name (PTF_dFFFFFF_fFF_cCC_...)")
        field, filt, chip = (int(g) for g in match.groups())
        base = f"/photosex/filter{filt:02d}/field{field:06d}/chip{chip:02d}"
        frame = _with_light_curves(
            _read_table(path, f"{base}/sources"),
            _read_table(path, f"{base}/sourcedata"),
            "matchedSourceID",
        )
        frame["_id"] = [
            int(f"{field}{filt:02d}{chip:02d}{m:08d}") for m in frame["matchedSourceID"]
        ]
        frame["field"], frame["filter"], frame["chip"] = field, filt, chip
        exposures_frame = _read_table(path, f"{base}/exposures")
        reports += _ingest_matchfile(db, path, frame, exposures_frame, (sources, exposures), **kw)
    return reports


def ztf_matchfiles(
    db: Database[Doc], paths: list[Path], tag: str = "20210401", **kw: Any
) -> list[Report]:
    """ZTF PSF-photometry matchfiles: `ZTF_sources_<tag>` (with light curves) + `ZTF_exposures_<tag>`.
    Source `_id` = field (3 digits) + filter + readout channel (2) + matchid (8 digits)."""
    reports = []
    for path in paths:
        match = MATCHFILE.search(path.name)
        if not match:
            raise ReadError(
                f"{path.name}: not a ZTF matchfile name (ztf_FFFFFF_zX_cCC_qQ_match...)"
            )
        field, filt, ccd, quad = (
            int(match[1]),
            ZTF_FILTERS[match[2].lower()],
            int(match[3]),
            int(match[4]),
        )
        rc = (ccd - 1) * 4 + quad - 1
        frame = _with_light_curves(
            _read_table(path, "/matches/sources"),
            _read_table(path, "/matches/sourcedata"),
            "matchid",
        )
        frame["_id"] = [int(f"{field}{filt}{rc:02d}{m:08d}") for m in frame["matchid"]]
        frame["field"], frame["filter"], frame["ccd"], frame["quad"], frame["rc"] = (
            field,
            filt,
            ccd,
            quad,
            rc,
        )
        exposures_frame = _read_table(path, "/matches/exposures")
        reports += _ingest_matchfile(
            db, path, frame, exposures_frame, (f"ZTF_sources_{tag}", f"ZTF_exposures_{tag}"), **kw
        )
    return reports


def ztf_source_features(
    db: Database[Doc], path: Path, collection: str = "ZTF_source_features_DR5", **kw: Any
) -> list[Report]:
    """SCoPe features (HDF5 arrays): `stats` columns 0-2 are ZTF source id, ra, dec; the other
    blocks (stats, stats_EAOV, stats_ECE, stats_ELS) are kept as arrays under their names."""
    import tables

    with tables.open_file(path) as h5:
        stats = h5.root.stats.read()
        frame = pd.DataFrame(
            {"_id": stats[:, 0].astype(np.int64), "ra": stats[:, 1], "dec": stats[:, 2]}
        )
        frame["name"] = [n.decode() for n in h5.root.names.read()]
        frame["filter"] = [int(f) for f in h5.root.filters.read()]
        for node in h5.list_nodes("/", classname="Array"):
            if node.name.startswith("stats"):
                block = node.read()
                frame[node.name] = (
                    [list(row[1:]) for row in block]
                    if node.name != "stats"
                    else [list(row[3:]) for row in block]
                )
    return [
        ingest_chunks(
            db,
            collection,
            frame_chunks(frame, CHUNK_ROWS),
            Columns("ra", "dec", "_id"),
            path.name,
            len(frame),
            **kw,
        )
    ]


def ztf_source_classifications(
    db: Database[Doc], path: Path, collection: str = "ZTF_source_classifications_DR5", **kw: Any
) -> list[Report]:
    """SCoPe classifier scores `<algorithm>/<class>.../*.h5` (`preds`: source id, probability),
    merged into one document per source under `<class>_<algorithm>` (no positions in the file)."""
    import tables

    algorithm, label = path.parent.parent.name, path.parent.name.split(".")[0]
    with tables.open_file(path) as h5:
        preds = h5.root.preds.read()
    frame = pd.DataFrame({"_id": preds[:, 0].astype(np.int64), f"{label}_{algorithm}": preds[:, 1]})
    return [
        ingest_chunks(
            db,
            collection,
            frame_chunks(frame, CHUNK_ROWS),
            Columns(None, None, "_id"),
            path.name,
            len(frame),
            merge=True,
            **kw,
        )
    ]


# name pattern -> ingester, for `kowalski.py seed <directory>`
KNOWN: list[tuple[re.Pattern[str], Callable[..., list[Report]]]] = [
    (re.compile(r"VLASS.*\.csv$", re.I), vlass),
    (re.compile(r"igaps.*\.fits(\.gz)?$", re.I), igaps),
    (re.compile(r"^ztf_\d{6}_z[gri]_c\d{2}_q\d_dr\d+\.parquet$", re.I), ztf_public),
    (
        re.compile(r"^PTF_.*match\.pytable$", re.I),
        lambda db, p, **kw: ptf_matchfiles(db, [p], **kw),
    ),
    (
        re.compile(r"^ztf_\d{6}_z[gri]_c\d{2}_q\d_match\.pytable$", re.I),
        lambda db, p, **kw: ztf_matchfiles(db, [p], **kw),
    ),
    (re.compile(r"ztf_source_features/.*\.h5$", re.I), ztf_source_features),
    (re.compile(r"ztf_source_classifications/.*\.h5$", re.I), ztf_source_classifications),
]


def ingester_for(path: Path) -> Callable[..., list[Report]] | None:
    text = path.as_posix()
    for pattern, ingester in KNOWN:
        if pattern.search(text if "/" in pattern.pattern else path.name):
            return ingester
    return None
