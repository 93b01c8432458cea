"""Container health probes (the images' HEALTHCHECK): `python -m kowalski.health api|ingester`.

- ``api``: the API answers ``GET /healthz`` (public) on its configured port (``server.port``).
- ``ingester``: this process's consumer is a member of its Kafka consumer group
  (``kafka.group``): a member connects from the address this container uses to reach the broker.
  librdkafka leaves the group when its consumer stops polling (``max.poll.interval.ms``) or the
  process dies, so this reflects consumption, in LocalCluster and external-scheduler mode alike
  (the dask dashboard on 8787 is served only by a LocalCluster). A consumer joins its group only
  once a topic matches its subscriptions: while none does (a new deployment before its first
  night), there is nothing to consume and the probe says so and passes.

Exit status 0 when healthy, else 1 with one line on stderr saying why.
"""

from __future__ import annotations

import re
import socket
import sys
import urllib.error
import urllib.request

from kowalski.config import Config, ConfigError, load_config
from kowalski.surveys import SURVEYS

TIMEOUT_S = 4.0
WILDCARD_HOSTS = {"", "0.0.0.0", "::"}


class Unhealthy(Exception):
    """The probe's one-line reason."""


def local_host(host: str) -> str:
    """The address a process on this host reaches a server bound to `host` at (a wildcard bind
    address is reached on the loopback)."""
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


def api_url(cfg: Config) -> str:
    return f"http://{local_host(cfg.server.host)}:{cfg.server.port}/healthz"


def ingester_url(cfg: Config) -> str:
    """The ingester's own endpoint (`/metrics`, `/healthz`, `/readyz`), without a path."""
    return f"http://{local_host(cfg.ingester.metrics_host)}:{cfg.ingester.metrics_port}"


def probe_api(cfg: Config) -> None:
    url = api_url(cfg)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            status: int = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        raise Unhealthy(f"the API does not answer {url}: {exc}") from None
    if status != 200:
        raise Unhealthy(f"the API answers {url} with HTTP {status}")


def first_broker(bootstrap_servers: str) -> tuple[str, int]:
    host, _, port = bootstrap_servers.split(",")[0].strip().rpartition(":")
    return host.strip("[]"), int(port)


def local_address_towards(host: str, port: int) -> str:
    """The source address this machine uses to reach host:port (a UDP connect sends nothing)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.connect(address)
        local: str = sock.getsockname()[0]
        return local


def group_member_hosts(bootstrap_servers: str, group: str) -> list[str]:
    """The client addresses of the members of consumer group `group`, as the broker sees them."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    futures = admin.describe_consumer_groups([group], request_timeout=TIMEOUT_S)
    description = futures[group].result(timeout=TIMEOUT_S)
    return [member.host.lstrip("/") for member in description.members]


def subscribed_topics(cfg: Config, bootstrap_servers: str) -> list[str]:
    """The broker's topics that the enabled surveys' subscriptions (patterns) match."""
    from confluent_kafka.admin import AdminClient

    patterns = [
        re.compile(SURVEYS[name].subscription(cfg.kafka.topics)) for name in cfg.enabled_surveys()
    ]
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    topics = admin.list_topics(timeout=TIMEOUT_S).topics
    return [topic for topic in topics if any(p.match(topic) for p in patterns)]


def probe_ingester(cfg: Config) -> None:
    servers, group = cfg.kafka.bootstrap_servers, cfg.kafka.group
    try:
        here = local_address_towards(*first_broker(servers))
        hosts = group_member_hosts(servers, group)
        topics = [] if here in hosts else subscribed_topics(cfg, servers)
    except Exception as exc:  # any failure to ask the broker is unhealthy
        raise Unhealthy(f"cannot describe consumer group {group!r} at {servers}: {exc}") from None
    if here in hosts:
        return
    if topics:
        raise Unhealthy(
            f"no member of consumer group {group!r} connects from {here} (members: {hosts}) "
            f"while {len(topics)} topic(s) match its subscriptions, e.g. {topics[0]}"
        )
    print(f"no topic matches the subscriptions of consumer group {group!r} yet: nothing to consume")


PROBES = {"api": probe_api, "ingester": probe_ingester}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in PROBES:
        print(f"usage: python -m kowalski.health {{{'|'.join(PROBES)}}}", file=sys.stderr)
        return 2
    try:
        PROBES[argv[0]](load_config())
    except (ConfigError, Unhealthy) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
