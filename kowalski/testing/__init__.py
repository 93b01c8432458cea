"""Public testing helpers: start real servers (embedded MongoDB-compatible SecantusDB, a local Kafka
broker, the API under gunicorn) on free ports, as `safir.testing` does for Safir apps.

Used by the test suite, the bench and the `up --local` supervisor (`ops/local.py`)."""
