"""The local services Kowalski can run on one machine without Docker: free ports and process
control (`process`), the embedded MongoDB-compatible SecantusDB (`mongo`, `secantus`), an Apache
Kafka KRaft broker from Maven Central jars (`kafka`), the API under gunicorn (`api`) and dask
clusters (`dask`). Used by `up --local` (`ops/local.py`), the entry points, the bench and the tests;
production code imports these, never `kowalski.testing`."""
