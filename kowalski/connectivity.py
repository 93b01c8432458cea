"""Reaching the database and Kafka from a command (seed, catalogs, bench, replay): a quick check
before the work starts, and one line instead of a traceback when a server cannot be reached or
refuses the credentials: which server was tried (and where its address came from), why, and what
to do. Exit status 1."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, NoReturn

from pymongo import MongoClient
from pymongo.errors import ConfigurationError, ConnectionFailure, OperationFailure, PyMongoError

from kowalski.config import CONFIGURED, Config
from kowalski.db import mongo_uri

AUTH_CODES = (13, 18)  # Unauthorized, AuthenticationFailed
ENV_NAMES = {"database": "MONGODB_URI", "kafka": "KAFKA_BOOTSTRAP_SERVERS"}
SERVICE_NAMES = {"database": "MongoDB", "kafka": "Kafka"}
Service = Literal["database", "kafka"]


class Unreachable(Exception):
    """A server a command needs cannot be used; the message is one line."""


def hide_password(uri: str) -> str:
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


def _hint(cfg: Config, service: Service) -> str:
    origin = cfg.origin(service)
    if origin == CONFIGURED[service]:
        return f"is `./kowalski.py up --local` running? or set {ENV_NAMES[service]}"
    if origin.startswith("the running local instance"):
        return (
            "the local instance did not answer: see var/logs/, or restart it "
            "(`./kowalski.py down --local`, then `./kowalski.py up --local`)"
        )
    return f"check {origin}, or unset it to use `./kowalski.py up --local`"


def unreachable(cfg: Config, service: Service, reason: str) -> Unreachable:
    address = mongo_uri(cfg) if service == "database" else cfg.kafka.bootstrap_servers
    return Unreachable(
        f"cannot use {SERVICE_NAMES[service]} at {hide_password(address)} "
        f"({cfg.origin(service)}): {reason}; {_hint(cfg, service)}"
    )


def mongo_reason(exc: PyMongoError) -> str:
    """A short reason: no traceback, no topology description."""
    if isinstance(exc, OperationFailure) and exc.code in AUTH_CODES:
        return "authentication failed" if exc.code == 18 else f"not authorized ({exc.details})"
    text = str(exc).split(", Timeout:")[0].split(" (configured timeouts")[0]
    return " ".join(text.split()) or type(exc).__name__


def is_connection_problem(exc: BaseException) -> bool:
    if isinstance(exc, OperationFailure):
        return exc.code in AUTH_CODES
    return isinstance(exc, ConnectionFailure | ConfigurationError)


def require_database(cfg: Config, timeout_ms: int = 5000) -> None:
    """Raise `Unreachable` unless the database answers and accepts the credentials."""
    try:
        client: MongoClient[dict[str, object]] = MongoClient(
            mongo_uri(cfg), serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms
        )
    except ConfigurationError as exc:
        raise unreachable(cfg, "database", f"not a valid MongoDB URI ({exc})") from None
    try:
        client[cfg.database.db][cfg.database.collection("users")].find_one({}, {"_id": 1})
    except PyMongoError as exc:
        raise unreachable(cfg, "database", mongo_reason(exc)) from None
    finally:
        client.close()


def require_kafka(cfg: Config, timeout_s: float = 5.0) -> None:
    """Raise `Unreachable` unless a Kafka broker answers at the configured bootstrap servers."""
    from kowalski.services.kafka import broker_ready

    try:
        ready = broker_ready(cfg.kafka.bootstrap_servers, timeout=timeout_s)
    except ValueError:
        raise unreachable(cfg, "kafka", "not a host:port list") from None
    if not ready:
        raise unreachable(cfg, "kafka", "no broker answered")


def _exit(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


@contextmanager
def one_line_errors(cfg: Config) -> Iterator[None]:
    """For entry points: a server that cannot be used (before or during the work) ends the
    command with one line on stderr and exit status 1; any other error keeps its traceback."""
    try:
        yield
    except Unreachable as exc:
        _exit(str(exc))
    except PyMongoError as exc:
        if not is_connection_problem(exc):
            raise
        _exit(str(unreachable(cfg, "database", mongo_reason(exc))))
