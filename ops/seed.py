"""`kowalski.py seed <directory>`: load every catalog found in a directory into the configured
database: the known upstream samples with their ingesters, `mongorestore` archives
(`*.dump`, `*.archive`, optionally `.gz`) when the tool is installed (it reads the database
password from a `--config` file of mode 0600, deleted after, never from its command line).

`kowalski.py seed --index-cells COLLECTION`: add the sky cell (kowalski/skycells.py) in place to
the documents of a collection loaded without it (e.g. restored from an upstream dump), then its
index; cone searches use the cells from then on. Idempotent and resumable."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import yaml
from pymongo import UpdateOne
from pymongo.collection import Collection
from tqdm import tqdm

from kowalski.cones import GEO_FIELD
from kowalski.config import Config, load_config
from kowalski.connectivity import one_line_errors, require_database
from kowalski.db import create_index_sync, mongo_uri, sync_client
from kowalski.documents import Doc
from kowalski.skycells import CELL_FIELD, CELL_INDEX, CELL_INDEX_NAME, add_cells
from ops.catalogs.ingest import CHECKPOINTS, Report
from ops.catalogs.readers import ReadError
from ops.catalogs.surveys import ingester_for

ARCHIVES = (".dump", ".archive", ".dump.gz", ".archive.gz")
CELL_BATCH = 1000


def without_password(uri: str) -> tuple[str, str | None]:
    """`uri` with the password taken out of its user info, and that password (None: none)."""
    parts = urlsplit(uri)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not at or not colon:
        return uri, None
    return urlunsplit(parts._replace(netloc=f"{user}@{hosts}")), unquote(password)


@contextmanager
def password_config(password: str | None) -> Iterator[list[str]]:
    """mongorestore's `--config` option for `password` (a YAML file only this user may read,
    deleted after), so that the password is never on a command line other users can see."""
    if password is None:
        yield []
        return
    with tempfile.TemporaryDirectory(prefix="kowalski-restore-") as folder:
        path = Path(folder) / "mongorestore.yaml"
        path.touch(mode=0o600)
        path.write_text(yaml.safe_dump({"password": password}))
        yield [f"--config={path}"]


def restore(uri: str, db_name: str, archive: Path, drop: bool) -> str:
    tool = shutil.which("mongorestore")
    if not tool:
        return f"{archive.name}: skipped (mongorestore not installed)"
    bare_uri, password = without_password(uri)
    cmd = [tool, f"--uri={bare_uri}", f"--archive={archive}", f"--nsInclude={db_name}.*"]
    cmd += ["--gzip"] if archive.name.endswith(".gz") else []
    cmd += ["--drop"] if drop else []
    with password_config(password) as config:
        result = subprocess.run(cmd + config, capture_output=True, text=True)
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
                    f"{path.name}: not a known catalog (use python -m ops.catalogs ingest)"
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


def _set_cells(coll: Collection[Doc], docs: list[Doc]) -> None:
    add_cells(docs)
    coll.bulk_write(
        [
            UpdateOne({"_id": d["_id"]}, {"$set": {CELL_FIELD: d["coordinates"]["cell"]}})
            for d in docs
        ],
        ordered=False,
    )


def index_cells(coll: Collection[Doc], batch: int = CELL_BATCH, progress: bool = True) -> int:
    """Set the sky cell on every located document of `coll` lacking it, in batches, then create
    the cell index (last, so its presence means the collection is done); how many were set."""
    missing = {CELL_FIELD: {"$exists": False}, GEO_FIELD: {"$exists": True}}
    bar = tqdm(
        total=coll.count_documents(missing),
        desc=f"sky cells {coll.name}",
        unit="doc",
        disable=not progress,
    )
    done = 0
    pending: list[Doc] = []
    for doc in coll.find(missing, {GEO_FIELD: 1}, batch_size=batch):
        pending.append(doc)
        if len(pending) >= batch:
            _set_cells(coll, pending)
            done, pending = done + len(pending), []
            bar.update(batch)
    if pending:
        _set_cells(coll, pending)
        done += len(pending)
        bar.update(len(pending))
    bar.close()
    create_index_sync(coll, CELL_INDEX, CELL_INDEX_NAME)
    return done


def seed_cells(collections: list[str]) -> int:
    cfg = load_config()
    with sync_client(cfg) as client:
        db = client[cfg.database.db]
        for name in collections:
            if name not in db.list_collection_names():
                print(f"error: no collection {name!r} in database {cfg.database.db!r}")
                return 1
            print(f"{name}: sky cells set on {index_cells(db[name])} documents, index ready")
    return 0
