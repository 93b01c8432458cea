"""Catalog ingestion: generic (FITS, CSV, Parquet, HDF5) and the upstream survey ingesters."""
