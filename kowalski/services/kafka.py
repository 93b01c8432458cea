"""Local Apache Kafka (KRaft, single node: broker + controller) for development and tests.

The broker jars come from Maven Central through `kowalski/services/kafka-pom.xml` (pinned version), cached
under `var/kafka-libs/<version>/`; the broker runs on the machine's JDK. Point KAFKA_BOOTSTRAP_SERVERS
at an existing broker to skip all of this.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kowalski.config import ROOT
from kowalski.services.process import (
    ServiceError,
    ToolMissing,
    ensure_port_free,
    free_port,
    port_in_use,
    start_process,
    stop_process,
    wait_until,
)

POM = Path(__file__).with_name("kafka-pom.xml")
DEFAULT_LIBS = ROOT / "var" / "kafka-libs"  # the checkout's jar cache (tests, benchmarks)
LOG4J2 = """\
Configuration:
  status: warn
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
"""


def pom_version() -> str:
    text = POM.read_text()
    start = text.index("<kafka.version>") + len("<kafka.version>")
    return text[start : text.index("</kafka.version>")]


def _require(tool: str, purpose: str) -> str:
    found = shutil.which(tool)
    if not found:
        raise ToolMissing(
            f"cannot {purpose}: '{tool}' not found on PATH "
            "(install it, or set KAFKA_BOOTSTRAP_SERVERS to a running broker)"
        )
    return found


def ensure_jars(cache_root: Path) -> Path:
    """Download the broker jars once with Maven; return the directory holding them."""
    libs = cache_root.resolve() / pom_version()
    marker = libs / ".complete"
    if marker.exists():
        return libs
    mvn = _require("mvn", "download the Kafka broker")
    libs.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        last = (result.stdout + result.stderr).strip().splitlines()[-3:]
        raise ServiceError(f"downloading the Kafka broker with Maven failed: {' | '.join(last)}")
    marker.touch()
    return libs


def cluster_id() -> str:
    """A new cluster id as Kafka's `Uuid.randomUuid()` makes one: a random UUID in unpadded
    base64url (22 characters), drawn again while it starts with '-' (the storage tool would read
    it as an option) or is one of Kafka's reserved ids (all zeros, the metadata topic's 0...1)."""
    reserved = {bytes(16), bytes(15) + b"\x01"}
    while True:
        raw = uuid.uuid4().bytes
        text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        if raw not in reserved and not text.startswith("-"):
            return text


def broker_ready(bootstrap: str, timeout: float = 1.0) -> bool:
    from confluent_kafka.admin import AdminClient

    if not port_in_use(*_host_port(bootstrap)):
        return False
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        metadata = admin.list_topics(timeout=timeout)
        return bool(metadata.brokers)
    except Exception:
        return False


def _host_port(bootstrap: str) -> tuple[str, int]:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    return host, int(port)


@dataclass
class LocalKafka:
    """A single-node KRaft Kafka on `host:port` with its controller on `controller_port`."""

    data_dir: Path
    port: int
    controller_port: int
    libs_cache: Path
    host: str = "127.0.0.1"
    heap: str = "512m"
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @classmethod
    def on_free_ports(cls, data_dir: Path, libs_cache: Path = DEFAULT_LIBS) -> LocalKafka:
        """A broker (not started) in `data_dir` on free ports, jars cached in `libs_cache`."""
        return cls(data_dir, port=free_port(), controller_port=free_port(), libs_cache=libs_cache)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "kafka.log"

    def _properties(self) -> str:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{self.host}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},"
            f"CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir / "logs"),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "message.max.bytes": "10485760",
            "log.retention.hours": "168",
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _java(self, libs: Path, *args: str) -> list[str]:
        java = _require("java", "run the Kafka broker")
        return [
            java,
            f"-Xmx{self.heap}",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.yaml'}",
            "-cp",
            f"{libs}/*",
            *args,
        ]

    def start(self, timeout: float = 90) -> LocalKafka:
        for port in (self.port, self.controller_port):
            ensure_port_free(
                self.host, port, "Kafka", "stop what holds it or set KAFKA_BOOTSTRAP_SERVERS"
            )
        libs = ensure_jars(self.libs_cache)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = self.data_dir / "server.properties"
        props.write_text(self._properties())
        (self.data_dir / "log4j2.yaml").write_text(LOG4J2)
        if not (self.data_dir / "logs" / "meta.properties").exists():
            fmt = subprocess.run(
                self._java(
                    libs, "kafka.tools.StorageTool", "format", "-t", cluster_id(), "-c", str(props)
                ),
                capture_output=True,
                text=True,
            )
            if fmt.returncode != 0:
                raise ServiceError(f"formatting Kafka storage failed: {fmt.stderr.strip()[-300:]}")
        self.process = start_process(self._java(libs, "kafka.Kafka", str(props)), self.log_file)
        wait_until(
            lambda: broker_ready(self.bootstrap_servers),
            self.process,
            timeout,
            "Kafka",
            self.log_file,
        )
        return self

    def stop(self) -> None:
        stop_process(self.process, timeout=30)
        self.process = None

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def create_topics(bootstrap: str, topics: list[str], partitions: int) -> None:
    """Create `topics` with `partitions` partitions each (one already there is left as it is)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(t, partitions) for t in topics]).values():
        try:
            future.result(60)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise ServiceError(f"creating a topic failed: {exc.args[0]}") from exc


def produce_spread(bootstrap: str, by_topic: dict[str, list[bytes]], partitions: int) -> None:
    """Produce each topic's messages dealt over its `partitions` partitions in turn (so every
    partition gets alerts, which a keyless producer's sticky partitioner does not promise)."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 10_485_760})
    for topic, messages in by_topic.items():
        for n, message in enumerate(messages):
            producer.produce(topic, message, partition=n % partitions)
            producer.poll(0)
    if producer.flush(60):
        raise ServiceError("packets were not delivered to Kafka")


def members_assigned(bootstrap: str, group: str, members: int) -> bool:
    """The consumer group is stable with `members` members, each holding partitions."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        description = admin.describe_consumer_groups([group])[group].result(30)
    except (KafkaException, TimeoutError):  # no coordinator yet, ...
        return False
    held = [m.assignment.topic_partitions for m in description.members if m.assignment]
    return len(held) == members and all(held)


def offsets_behind(bootstrap: str, group: str, topics: list[str]) -> list[str]:
    """The partitions of `topics` whose offset committed by `group` is not at their end (a
    partition without messages has no offset to commit and is never behind)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        metadata = consumer.list_topics(timeout=30).topics
        partitions = [
            TopicPartition(t, p) for t in topics if t in metadata for p in metadata[t].partitions
        ]
        missing = [f"{t}: no such topic" for t in topics if t not in metadata]
        committed = consumer.committed(partitions, timeout=30) if partitions else []
        behind = []
        for tp in committed:
            end = consumer.get_watermark_offsets(tp, timeout=30)[1]
            if end > 0 and tp.offset != end:
                behind.append(f"{tp.topic}[{tp.partition}] at {tp.offset} of {end}")
        return missing + behind
    except KafkaException as exc:
        return [f"offsets not read: {exc.args[0]}"]
    finally:
        consumer.close()
