"""Stage 1: decode Avro alert packets (object container files, or Confluent-framed records whose
writer schema comes from a schema registry) into dicts.

Each distinct writer schema is parsed once and cached (upstream re-parsed it for every packet).
Schemas are parsed leniently about invalid union defaults, which some real packets (TURBO) carry
and fastavro >= 1.7 otherwise refuses; defaults play no part in reading with the writer schema.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import zlib
from typing import Any, cast

import fastavro
from fastavro import schemaless_reader

from ingester.registry_client import SchemaRegistry, UnknownSchema, schema_id_of, version_of
from kowalski.surveys import Survey

MAGIC = b"Obj\x01"
CONFLUENT_MAGIC = 0
CONFLUENT_HEADER = 5  # magic byte + 4-byte big-endian schema id
SYNC_SIZE = 16
HEADER_SCHEMA = fastavro.parse_schema(
    {
        "type": "record",
        "name": "org.apache.avro.file.Header",
        "fields": [
            {"name": "magic", "type": {"type": "fixed", "name": "Magic", "size": 4}},
            {"name": "meta", "type": {"type": "map", "values": "bytes"}},
            {"name": "sync", "type": {"type": "fixed", "name": "Sync", "size": SYNC_SIZE}},
        ],
    }
)


class DecodeError(ValueError):
    """A packet that is not a readable Avro alert; the message says why."""


@functools.lru_cache(maxsize=64)
def _parsed_schema(digest: str, schema_json: bytes) -> Any:
    try:
        return fastavro.parse_schema(json.loads(schema_json), _ignore_default_error=True)
    except (ValueError, KeyError, TypeError, fastavro.schema.SchemaParseException) as exc:
        raise DecodeError(f"invalid writer schema: {exc}") from None


def _read_record(buf: io.BytesIO, schema: Any) -> dict[str, Any]:
    """One record: fastavro types its result as any Avro value; a record schema reads a dict."""
    return cast(dict[str, Any], schemaless_reader(buf, schema, None))


def _read_long(buf: io.BytesIO) -> int:
    shift, result = 0, 0
    while True:
        byte = buf.read(1)
        if not byte:
            raise DecodeError("truncated Avro block header")
        b = byte[0]
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1)
        shift += 7
        if shift > 63:
            raise DecodeError("corrupt Avro varint")


def writer_schema(packet: bytes) -> dict[str, Any]:
    """The writer schema embedded in a packet (JSON), e.g. to read its version."""
    header = _read_record(io.BytesIO(packet), HEADER_SCHEMA)
    schema: dict[str, Any] = json.loads(header["meta"]["avro.schema"])
    return schema


def decode_packet(packet: bytes) -> list[dict[str, Any]]:
    """All records of one Avro container (ZTF sends one alert per packet)."""
    if not isinstance(packet, bytes | bytearray | memoryview) or bytes(packet[:4]) != MAGIC:
        raise DecodeError("not an Avro object container (bad magic bytes)")
    buf = io.BytesIO(bytes(packet))
    try:
        header = _read_record(buf, HEADER_SCHEMA)
    except (EOFError, ValueError, StopIteration) as exc:
        raise DecodeError(f"unreadable Avro header: {exc}") from None
    meta: dict[str, bytes] = header["meta"]
    schema_json = meta.get("avro.schema")
    if not schema_json:
        raise DecodeError("Avro header has no schema")
    codec = meta.get("avro.codec", b"null").decode()
    if codec not in ("null", "deflate"):
        raise DecodeError(f"unsupported Avro codec {codec}")
    schema = _parsed_schema(hashlib.sha1(schema_json).hexdigest(), schema_json)
    records: list[dict[str, Any]] = []
    size = len(buf.getbuffer())
    while buf.tell() < size:
        count = _read_long(buf)
        length = _read_long(buf)
        block = buf.read(length)
        if len(block) != length:
            raise DecodeError("truncated Avro block")
        if codec == "deflate":
            block = zlib.decompress(block, -15)
        block_buf = io.BytesIO(block)
        try:
            for _ in range(count):
                records.append(_read_record(block_buf, schema))
        except (EOFError, ValueError, StopIteration, IndexError) as exc:
            raise DecodeError(f"corrupt Avro record: {exc}") from None
        if buf.read(SYNC_SIZE) != header["sync"]:
            raise DecodeError("Avro sync marker mismatch")
    if not records:
        raise DecodeError("Avro container holds no records")
    return records


def confluent_schema_id(packet: bytes) -> int:
    """The schema id of a Confluent-framed packet."""
    if len(packet) < CONFLUENT_HEADER or packet[0] != CONFLUENT_MAGIC:
        raise DecodeError("not a Confluent-framed record (no magic byte 0 + schema id)")
    return int.from_bytes(packet[1:CONFLUENT_HEADER], "big")


def decode_confluent(packet: bytes, schemas: SchemaRegistry) -> list[dict[str, Any]]:
    """The one record of a Confluent-framed packet, with `schemavsn` (Rubin id 701 -> "7.1")."""
    schema_id = confluent_schema_id(packet)
    try:
        schema = schemas.schema(schema_id)
    except UnknownSchema as exc:
        raise DecodeError(str(exc)) from None
    buf = io.BytesIO(packet[CONFLUENT_HEADER:])
    try:
        record = _read_record(buf, schema)
    except (EOFError, ValueError, StopIteration, IndexError, UnicodeDecodeError) as exc:
        raise DecodeError(
            f"truncated or corrupt record for schema id {schema_id}: {exc!r}"
        ) from None
    left = len(packet) - CONFLUENT_HEADER - buf.tell()
    if left:
        raise DecodeError(f"{left} bytes left after the record (schema id {schema_id})")
    return [{**record, "schemavsn": version_of(schema_id)}]


def frame_confluent(schema_id: int, record: dict[str, Any], schema: Any) -> bytes:
    """A record in Confluent wire format (what Rubin's Kafka stream sends)."""
    buf = io.BytesIO()
    buf.write(bytes([CONFLUENT_MAGIC]) + schema_id.to_bytes(4, "big"))
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def decode_for(
    survey: Survey, packet: bytes, schemas: SchemaRegistry | None
) -> list[dict[str, Any]]:
    """Records of a packet of `survey`: container files for every survey; Confluent framing for
    surveys that stream it. Records of Rubin container files also get their `schemavsn`."""
    packet = bytes(packet)
    if packet[:4] == MAGIC:
        records = decode_packet(packet)
        if survey.framing == "confluent":
            schema = writer_schema(packet)
            try:
                version = version_of(schema_id_of(f"{schema.get('namespace')}.{schema['name']}"))
            except (KeyError, ValueError) as exc:
                raise DecodeError(f"writer schema without a Rubin version: {exc}") from None
            records = [{**record, "schemavsn": version} for record in records]
        return records
    if survey.framing == "confluent" and schemas is not None:
        return decode_confluent(packet, schemas)
    return decode_packet(packet)
