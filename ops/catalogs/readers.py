"""Read catalog files in chunks: FITS (also gzipped), CSV, Parquet, HDF5 (pandas or PyTables)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

CHUNK_ROWS = 2048
FORMATS = {
    ".fits": "fits",
    ".fit": "fits",
    ".fits.gz": "fits",
    ".fit.gz": "fits",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".pytable": "hdf5",
}


class ReadError(ValueError):
    """A file that cannot be read as a catalog; the message says why."""


def file_format(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    raise ReadError(f"{path.name}: unknown catalog format (known: {', '.join(sorted(FORMATS))})")


def table_to_frame(table: np.ndarray) -> pd.DataFrame:
    """A numpy structured array -> DataFrame; multi-dimensional columns become lists."""
    columns = {}
    for name in table.dtype.names or ():
        values = table[name]
        columns[name] = list(values) if values.ndim > 1 else values
    return pd.DataFrame(columns)


def count_rows(path: Path, key: str | None = None) -> int | None:
    fmt = file_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    if fmt == "fits":
        from astropy.io import fits

        with fits.open(path, memmap=False) as hdul:
            return int(hdul[1].header.get("NAXIS2", 0))
    if fmt == "hdf5" and key:
        import tables

        with tables.open_file(path) as h5:
            return int(h5.get_node(key).nrows)
    return None


def read_chunks(
    path: Path, key: str | None = None, chunk_rows: int = CHUNK_ROWS
) -> Iterator[pd.DataFrame]:
    """Chunks of a table file. For HDF5, `key` is the table's node path (e.g. /matches/sources)."""
    if not path.exists():
        raise ReadError(f"{path}: no such file")
    fmt = file_format(path)
    try:
        if fmt == "csv":
            yield from pd.read_csv(path, chunksize=chunk_rows)
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
                yield batch.to_pandas()
        elif fmt == "fits":
            from astropy.table import Table

            table = Table.read(path, hdu=1, format="fits")
            for start in range(0, len(table), chunk_rows):
                yield table_to_frame(table[start : start + chunk_rows].as_array())
        else:
            yield from _hdf5_chunks(path, key, chunk_rows)
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, ReadError):
            raise
        raise ReadError(f"{path.name}: cannot read as {fmt}: {exc}") from None


def _hdf5_chunks(path: Path, key: str | None, chunk_rows: int) -> Iterator[pd.DataFrame]:
    import tables

    with tables.open_file(path) as h5:
        if key is None:
            found = [n._v_pathname for n in h5.walk_nodes("/", classname="Table")]
            if len(found) != 1:
                raise ReadError(f"{path.name}: give the table's key, one of {found}")
            key = found[0]
        node = h5.get_node(key)
        for start in range(0, node.nrows, chunk_rows):
            yield table_to_frame(node.read(start, min(start + chunk_rows, node.nrows)))
