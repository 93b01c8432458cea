"""Helpers for tests only (as `safir.testing`): stored filter documents (`filters`) and a TCP relay
that holds a server's replies (`stall`). Nothing outside `tests/` and `bench/` imports this package
(checked by tests/test_layout.py); the local servers the tests start live in `kowalski.services`."""
