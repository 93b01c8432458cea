"""Operations: the local supervisor (`up --local`), seeding, and the catalog loaders
(`python -m ops.catalogs`). May import the core (`kowalski/`), the ingester and the testing helpers;
nothing in `kowalski/`, `api/` or `ingester/` imports it."""
