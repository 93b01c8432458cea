"""The bundled real data is byte-identical to what its provenance says."""

from __future__ import annotations

import csv
import hashlib

from .conftest import DATA


def test_every_bundled_file_matches_the_manifest() -> None:
    rows = list(csv.DictReader((DATA / "MANIFEST.tsv").open(), delimiter="\t"))
    assert len(rows) >= 100
    for row in rows:
        path = DATA / row["path"]
        assert path.exists(), row["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"], row["path"]
