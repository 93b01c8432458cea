"""Writer schemas of Confluent-framed streams (Rubin/LSST): a Confluent schema registry, each id
fetched once per process and cached, with the bundled schemas as the fallback when there is no
registry or it does not answer.

Registry API: `GET {url}/schemas/ids/{id}` -> `{"schema": "<Avro JSON as a string>",
"references": [{"name", "subject", "version"}, ...]}`; referenced named types (Rubin splits its
schemas into alert, diaSource, diaObject, ...) are read from `GET
{url}/subjects/{subject}/versions/{version}` and parsed first, sharing fastavro's named types.
Bundled: `<folder>/MAJOR/MINOR/*.alert.avsc` for Rubin's ids (MAJOR*100+MINOR); fastavro's
`load_schema` resolves the other files of the folder.

Why not `confluent_kafka.schema_registry.SchemaRegistryClient`: it needs the `schemaregistry`
extra (httpx, authlib, attrs, cachetools) in the ingester image for two GET routes, and the work
here is elsewhere: parsing the references into fastavro's named types, the bundled fallback, and
remembering unknown ids (`UNKNOWN_RETRY_SECONDS`) so that a registry outage costs one timeout, not
one per alert.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import load_schema

from kowalski.config import Config
from kowalski.surveys import Survey

log = logging.getLogger("kowalski.ingester")
UNKNOWN_RETRY_SECONDS = 300.0  # an id nobody knows is asked again after this long


class UnknownSchema(LookupError):
    """No registry answer and no bundled schema for this id."""


class RegistryUnavailable(OSError):
    """The registry did not answer (down, timeout, server error)."""


def schema_id_of(name: str) -> int:
    """Rubin's schema id from a schema name or namespace: `lsst.v7_1.alert` -> 701."""
    found = re.search(r"v(\d+)_(\d+)", name)
    if not found:
        raise ValueError(f"no Rubin schema version in {name!r}")
    return int(found[1]) * 100 + int(found[2])


def version_of(schema_id: int) -> str:
    """701 -> "7.1"."""
    return f"{schema_id // 100}.{schema_id % 100}"


def bundled_schema(folder: Path, schema_id: int) -> Any:
    """The parsed bundled schema of a Rubin id, or UnknownSchema."""
    major, minor = divmod(schema_id, 100)
    found = sorted((folder / str(major) / str(minor)).glob("*.alert.avsc"))
    if not found:
        raise UnknownSchema(f"unknown schema id {schema_id} (no registry answer, none bundled)")
    return load_schema(str(found[0]))


@dataclass
class SchemaRegistry:
    """Parsed writer schemas by id: registry first, then bundled; thread-safe, each id fetched
    once (the lock is held while fetching, so concurrent batches do not ask twice)."""

    url: str | None
    folder: Path
    timeout_s: float = 5.0
    _parsed: dict[int, Any] = field(default_factory=dict)
    _unknown: dict[int, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def schema(self, schema_id: int) -> Any:
        cached = self._parsed.get(schema_id)
        if cached is not None:
            return cached
        with self._lock:
            if schema_id in self._parsed:
                return self._parsed[schema_id]
            failed_at = self._unknown.get(schema_id)
            if failed_at is not None and time.monotonic() - failed_at < UNKNOWN_RETRY_SECONDS:
                raise UnknownSchema(f"unknown schema id {schema_id}")
            try:
                parsed = self._resolve(schema_id)
            except UnknownSchema:
                self._unknown[schema_id] = time.monotonic()
                raise
            self._parsed[schema_id] = parsed
            return parsed

    def _resolve(self, schema_id: int) -> Any:
        if self.url:
            try:
                return self._from_registry(schema_id)
            except RegistryUnavailable as exc:
                log.warning("schema registry %s: %s; using the bundled schemas", self.url, exc)
            except UnknownSchema:
                log.warning("schema registry has no id %d; trying the bundled schemas", schema_id)
        return bundled_schema(self.folder, schema_id)

    def _get(self, path: str) -> dict[str, Any]:
        assert self.url is not None
        request = urllib.request.Request(
            f"{self.url.rstrip('/')}{path}",
            headers={"Accept": "application/vnd.schemaregistry.v1+json, application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise UnknownSchema(f"unknown schema id ({path}: 404)") from None
            raise RegistryUnavailable(f"{path}: HTTP {exc.code}") from None
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
            raise RegistryUnavailable(f"{path}: {exc}") from None

    def _from_registry(self, schema_id: int) -> Any:
        answer = self._get(f"/schemas/ids/{schema_id}")
        named: dict[str, Any] = {}
        self._parse_references(answer.get("references") or [], named, set())
        return _parse(answer, named)

    def _parse_references(
        self, references: list[dict[str, Any]], named: dict[str, Any], seen: set[str]
    ) -> None:
        """Parse referenced subjects depth-first into `named` (each subject version once)."""
        for ref in references:
            key = f"{ref['subject']}/{ref['version']}"
            if key in seen:
                continue
            seen.add(key)
            answer = self._get(f"/subjects/{ref['subject']}/versions/{ref['version']}")
            self._parse_references(answer.get("references") or [], named, seen)
            _parse(answer, named)


def _parse(answer: dict[str, Any], named: dict[str, Any]) -> Any:
    if answer.get("schemaType", "AVRO") != "AVRO":
        raise UnknownSchema(f"registry schema is {answer['schemaType']}, not Avro")
    try:
        return fastavro.parse_schema(
            json.loads(answer["schema"]), named_schemas=named, _ignore_default_error=True
        )
    except (KeyError, ValueError, TypeError, fastavro.schema.SchemaParseException) as exc:
        raise UnknownSchema(f"registry schema unreadable: {exc}") from None


_REGISTRIES: dict[tuple[str | None, str, float], SchemaRegistry] = {}
_REGISTRIES_LOCK = threading.Lock()


def registry_for(url: str | None, folder: Path, timeout_s: float = 5.0) -> SchemaRegistry:
    """The process-wide registry client for (url, bundled folder): one cache per process."""
    key = (url, str(folder), timeout_s)
    with _REGISTRIES_LOCK:
        if key not in _REGISTRIES:
            _REGISTRIES[key] = SchemaRegistry(url, folder, timeout_s)
        return _REGISTRIES[key]


def registry_for_survey(cfg: Config, survey: Survey) -> SchemaRegistry | None:
    """The schema source of a Confluent-framed survey (None for container-file surveys)."""
    if survey.framing != "confluent":
        return None
    return registry_for(
        cfg.kafka.schema_registry_url,
        cfg.path("data") / survey.schema_folder,
        cfg.kafka.schema_registry_timeout_s,
    )
