"""`kowalski.py seed <directory>`: load every catalog found in a directory into the configured
database: the known upstream samples with their ingesters, `mongorestore` archives
(`*.dump`, `*.archive`, optionally `.gz`) when the tool is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from kowalski.catalogs.ingest import CHECKPOINTS, Report
from kowalski.catalogs.readers import ReadError
from kowalski.catalogs.surveys import ingester_for
from kowalski.config import Config, load_config
from kowalski.connectivity import one_line_errors, require_database
from kowalski.db import mongo_uri, sync_client

ARCHIVES = (".dump", ".archive", ".dump.gz", ".archive.gz")


def restore(uri: str, db_name: str, archive: Path, drop: bool) -> str:
    tool = shutil.which("mongorestore")
    if not tool:
        return f"{archive.name}: skipped (mongorestore not installed)"
    cmd = [tool, f"--uri={uri}", f"--archive={archive}", f"--nsInclude={db_name}.*"]
    cmd += ["--gzip"] if archive.name.endswith(".gz") else []
    cmd += ["--drop"] if drop else []
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return f"{archive.name}: mongorestore failed: {result.stderr.strip().splitlines()[-1:]}"
    return f"{archive.name}: restored"


def seed(source: Path, drop: bool = False) -> int:
    """Load every catalog under `source`; a database that cannot be used is one line, exit 1."""
    cfg = load_config()
    if not source.is_dir():
        print(f"error: {source} is not a directory", file=sys.stderr)
        return 1
    with one_line_errors(cfg):
        require_database(cfg)
        return _seed(cfg, source, drop)


def _seed(cfg: Config, source: Path, drop: bool) -> int:
    files = sorted(p for p in source.rglob("*") if p.is_file())
    reports: list[Report] = []
    notes: list[str] = []
    with sync_client(cfg) as client:
        db = client[cfg.database.db]
        dropped: set[str] = set()

        def drop_once(collection: str) -> None:
            if collection not in dropped:
                db[collection].drop()
                db[CHECKPOINTS].delete_many({"_id": {"$regex": f"^{re.escape(collection)}:"}})
                dropped.add(collection)

        for path in files:
            if path.name.endswith(ARCHIVES):
                notes.append(restore(mongo_uri(cfg), cfg.database.db, path, drop))
                continue
            ingester = ingester_for(path)
            if ingester is None:
                notes.append(
                    f"{path.name}: not a known catalog (use python -m kowalski.catalogs ingest)"
                )
                continue
            try:
                reports += ingester(db, path, prepare=drop_once if drop else None)
            except ReadError as exc:
                notes.append(f"{path.name}: {exc}")
    for report in reports:
        print(report.summary())
    for note in notes:
        print(note)
    return 0
