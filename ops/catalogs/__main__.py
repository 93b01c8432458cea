"""Ingest a catalog file: `python -m ops.catalogs ingest FILE --collection NAME
[--ra COL --dec COL --id COL] [--key /hdf5/table]`, or a synthetic one:
`python -m ops.catalogs synthetic --collection NAME --density 1000 --center 10 20 --radius 1`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kowalski.config import load_config_or_exit
from kowalski.connectivity import one_line_errors, require_database
from kowalski.db import sync_client
from ops.catalogs.ingest import Columns, frame_chunks, ingest_chunks
from ops.catalogs.readers import ReadError, count_rows, read_chunks
from ops.catalogs.synthetic import generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.catalogs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ing = sub.add_parser("ingest", help="ingest a FITS/CSV/Parquet/HDF5 table")
    ing.add_argument("file", type=Path)
    ing.add_argument("--collection", required=True)
    ing.add_argument("--ra", default="ra", help="RA column (degrees or sexagesimal)")
    ing.add_argument("--dec", default="dec", help="Dec column (degrees or sexagesimal)")
    ing.add_argument("--id", default=None, help="id column (default: file name + row number)")
    ing.add_argument("--key", default=None, help="HDF5 table node, e.g. /matches/sources")
    syn = sub.add_parser("synthetic", help="ingest a SYNTHETIC catalog (for tests/benchmarks)")
    syn.add_argument("--collection", required=True)
    syn.add_argument("--density", type=float, required=True, help="sources per square degree")
    syn.add_argument("--center", type=float, nargs=2, metavar=("RA", "DEC"))
    syn.add_argument("--radius", type=float, help="degrees (with --center)")
    syn.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = load_config_or_exit()
    with one_line_errors(cfg), sync_client(cfg) as client:
        require_database(cfg)
        db = client[cfg.database.db]
        try:
            if args.command == "ingest":
                report = ingest_chunks(
                    db,
                    args.collection,
                    read_chunks(args.file, args.key),
                    Columns(args.ra, args.dec, args.id),
                    args.file.name,
                    count_rows(args.file, args.key),
                )
            else:
                frame = generate(
                    args.density,
                    tuple(args.center) if args.center else None,
                    args.radius,
                    seed=args.seed,
                )
                report = ingest_chunks(
                    db,
                    args.collection,
                    frame_chunks(frame, 2048),
                    Columns("ra", "dec", "id", int),
                    f"synthetic:{args.seed}",
                    len(frame),
                )
        except ReadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
