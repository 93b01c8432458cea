"""The results stream: every pass of a filter with `stream` enabled, published to Kafka.

Shared by the ingester (which builds and publishes passes), the API (which validates the filter
option) and users (`python -m kowalski.results tail --filter 1`, which decodes the stream):

- the Avro schema (`schemas/results/filter_pass.avsc`), encoding and decoding,
- the topic of a filter (`kafka.results_topic`), the message headers and the dedup key,
- the filter option `stream`: `true`, or `{"active": bool, "cutouts": bool, "lightcurve": bool}`.
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fastavro

from kowalski.config import ROOT, Config
from kowalski.surveys import SURVEYS

SCHEMA_FILE = ROOT / "schemas" / "results" / "filter_pass.avsc"
SCHEMA_VERSION = "1.0"
DEDUP_HEADER = "kowalski-dedup"
SCHEMA_HEADER = "kowalski-schema"
STREAM_KEYS = frozenset({"active", "cutouts", "lightcurve"})


@functools.cache
def schema() -> Any:
    """The parsed results schema (the repository's file)."""
    return fastavro.parse_schema(json.loads(SCHEMA_FILE.read_text()))


def schema_name() -> str:
    return f"kowalski.results.FilterPass/{SCHEMA_VERSION}"


def encode(record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema(), record)
    return buffer.getvalue()


def decode(value: bytes) -> dict[str, Any]:
    record: dict[str, Any] = fastavro.schemaless_reader(io.BytesIO(value), schema())  # type: ignore[assignment]
    return record


def topic_for(cfg: Config, filter_id: int, survey: str) -> str:
    """`kafka.results_topic` for a filter on `survey`'s alerts: a topic per filter by default,
    or one per survey for all its filters' passes when the template has only `{survey}`."""
    return cfg.kafka.results_topic.format(filter_id=filter_id, survey=survey.lower())


def dedup_key(candid: int, filter_id: int, fid: str) -> str:
    """Unique per pass: what a consumer of an at-least-once stream deduplicates on."""
    return f"{candid}:{filter_id}:{fid}"


@dataclass(frozen=True)
class StreamOptions:
    """What a streaming filter publishes besides the always-present fields."""

    cutouts: bool = False
    lightcurve: bool = False


def validate_stream(value: Any) -> bool | dict[str, bool]:
    """The `stream` filter option as stored: a boolean, or an object of booleans with keys
    `active` (default true), `cutouts` and `lightcurve` (default false). Raises ValueError."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, dict):
        raise ValueError(
            'stream must be a boolean or an object {"active", "cutouts", "lightcurve"}'
        )
    unknown = set(value) - STREAM_KEYS
    if unknown:
        raise ValueError(
            f"stream has unknown keys {sorted(unknown)} (allowed: {sorted(STREAM_KEYS)})"
        )
    if not all(isinstance(v, bool) for v in value.values()):
        raise ValueError("stream options must be booleans")
    return {
        "active": value.get("active", True),
        "cutouts": value.get("cutouts", False),
        "lightcurve": value.get("lightcurve", False),
    }


def stream_options(stored: Any) -> StreamOptions | None:
    """The options of a stored `stream` value, or None when the filter does not stream."""
    try:
        value = validate_stream(stored if stored is not None else False)
    except ValueError:
        return None
    if isinstance(value, bool):
        return StreamOptions() if value else None
    if not value["active"]:
        return None
    return StreamOptions(cutouts=value["cutouts"], lightcurve=value["lightcurve"])


def printable(record: dict[str, Any]) -> dict[str, Any]:
    """A decoded record made JSON-friendly: cutouts as base64, JSON strings parsed."""
    out = dict(record)
    out["passed_at"] = str(out["passed_at"])
    out["annotations"] = json.loads(out["annotations"])
    out["cross_matches"] = json.loads(out["cross_matches"])
    if out.get("cutouts"):
        out["cutouts"] = {
            name: base64.b64encode(data).decode() if data is not None else None
            for name, data in out["cutouts"].items()
        }
    return out


def tail(
    bootstrap: str, topic: str, from_beginning: bool, idle_s: float | None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, record) of the committed passes on `topic`, as they come (read_committed)."""
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"kowalski-results-tail-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    topics = consumer.list_topics(topic, timeout=30).topics
    partitions = topics[topic].partitions if topics[topic].error is None else {}
    start = OFFSET_BEGINNING if from_beginning else OFFSET_END
    consumer.assign([TopicPartition(topic, p, start) for p in partitions])
    try:
        quiet = 0.0
        while idle_s is None or quiet < idle_s:
            msg = consumer.poll(1.0)
            if msg is None:
                quiet += 1.0
                continue
            error = msg.error()
            if error:
                if error.code() != KafkaError._PARTITION_EOF:
                    print(f"kafka: {error}", file=sys.stderr)
                continue
            quiet = 0.0
            yield (msg.key() or b"").decode(), decode(msg.value() or b"")
    finally:
        consumer.close()


def main(argv: list[str] | None = None) -> int:
    from kowalski.config import load_config_or_exit

    parser = argparse.ArgumentParser(prog="python -m kowalski.results", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    tail_cmd = commands.add_parser("tail", help="decode and print a filter's results stream")
    tail_cmd.add_argument("--filter", type=int, required=True, help="filter id")
    first = next(iter(SURVEYS))
    tail_cmd.add_argument(
        "--survey",
        default=first,
        choices=list(SURVEYS),
        help=f"the filter's survey (default {first})",
    )
    tail_cmd.add_argument("--from-beginning", action="store_true", help="not only new passes")
    tail_cmd.add_argument("--idle", type=float, help="stop after this many seconds without one")
    tail_cmd.add_argument("--full", action="store_true", help="print light curves and cutouts too")
    args = parser.parse_args(argv)
    cfg = load_config_or_exit()
    topic = topic_for(cfg, args.filter, args.survey)
    for key, record in tail(cfg.kafka.bootstrap_servers, topic, args.from_beginning, args.idle):
        if record["filter_id"] != args.filter:  # a per-survey topic holds every filter's passes
            continue
        shown = printable(record)
        if not args.full:
            for name in ("light_curve", "forced_photometry"):
                if shown.get(name) is not None:
                    shown[name] = f"<{len(shown[name])} points>"
            if shown.get("cutouts"):
                shown["cutouts"] = f"<{sorted(shown['cutouts'])}>"
        print(json.dumps({"key": key, **shown}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
