"""`kowalski.py up --local`: the whole system on this machine, no Docker.

Embedded MongoDB-compatible server (or MONGODB_URI), local Kafka (or KAFKA_BOOTSTRAP_SERVERS; when
no JDK/Maven is available the bundled alerts are stored directly instead), the API on
`server.port` (4000) served by gunicorn, the ingester on a dask LocalCluster, and a replay of the
bundled real alerts. Runs in the foreground until Ctrl-C (or `--detach`; `down --local` stops it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from kowalski.config import ROOT, Config, load_config, local_api_env
from kowalski.db import mongo_uri
from kowalski.health import ingester_url
from kowalski.instance import LocalInstance, read_instance, remove_instance, write_instance
from kowalski.services.api import ApiServer, answers
from kowalski.services.kafka import LocalKafka, broker_ready
from kowalski.services.mongo import EmbeddedMongo, ping
from kowalski.services.process import (
    ServiceError,
    ToolMissing,
    start_process,
    stop_process,
    wait_until,
)
from kowalski.surveys import SURVEYS, bundled_packets

INGESTER_START_S = 180.0


def var_dir(cfg: Config) -> Path:
    path = cfg.path(cfg.local.var_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pid_file(cfg: Config) -> Path:
    return var_dir(cfg) / "kowalski-local.pid"


def bundled_alerts() -> list[Path]:
    return bundled_packets(ROOT / "data")


def say(message: str) -> None:
    print(f"kowalski: {message}", flush=True)


def already_running(cfg: Config) -> str | None:
    """One line when another `up --local` on this var directory is running, else None."""
    running = read_instance(var_dir(cfg))
    if running is None:
        return None
    return (
        f"a local Kowalski is already running (pid {running.pid}, API at {running.api_url}); "
        "stop it first with ./kowalski.py down --local"
    )


def _is_up(cfg: Config, pid: int) -> bool:
    """The supervisor `pid` wrote its state file and its API answers."""
    running = read_instance(var_dir(cfg))
    return bool(
        running and running.pid == pid and answers(f"{running.api_url}/docs/api/openapi.json")
    )


def _detach(replay: bool) -> int:
    cfg = load_config()
    log = var_dir(cfg) / "logs" / "local.log"
    cmd = [sys.executable, str(ROOT / "kowalski.py"), "up", "--local"] + (
        [] if replay else ["--no-replay"]
    )
    proc = start_process(cmd, log, cwd=ROOT)
    try:
        wait_until(lambda: _is_up(cfg, proc.pid), proc, 300, "Kowalski (local)", log)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    say(
        f"running in the background (pid {proc.pid}); logs: {log}; stop with ./kowalski.py down --local"
    )
    return 0


def wait_for_ingester(cfg: Config, ingester: subprocess.Popen[bytes], log: Path) -> None:
    """Until the ingester's endpoint answers `/healthz` (its dask cluster is up and its consumer
    made), so that `status` right after `up` finds it. An ingester that exits meanwhile is an
    error; an endpoint that never answers (its port taken, or `ingester.metrics_port: 0`) is said
    in one line and is not fatal: the endpoint is optional."""
    if not cfg.ingester.metrics_port:
        say(f"ingester running, no endpoint (ingester.metrics_port: 0; logs: {log})")
        return
    url = f"{ingester_url(cfg)}/healthz"
    if wait_until(
        lambda: answers(url), ingester, INGESTER_START_S, "the ingester", log, required=False
    ):
        say(f"ingester running (endpoint {ingester_url(cfg)}, logs: {log})")
    else:
        say(f"ingester running, its endpoint {url} does not answer (logs: {log})")


def run_local(replay: bool = True, detach: bool = False) -> int:
    cfg = load_config()
    busy = already_running(cfg)
    if busy:
        print(f"error: {busy}", file=sys.stderr)
        return 1
    if detach:
        return _detach(replay)
    var = var_dir(cfg)
    logs = var / "logs"
    env = dict(os.environ)
    stack: list[object] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    pid_file(cfg).write_text(str(os.getpid()))
    try:
        # database
        if cfg.database.uri:
            if not ping(cfg.database.uri, timeout_ms=5000):
                raise ServiceError(f"MongoDB is not reachable at {cfg.database.uri}")
            say(f"using MongoDB at {cfg.database.uri}")
        else:
            mongo = EmbeddedMongo(var / "mongo", cfg.local.mongo_port, sync_on_commit=True).start()
            stack.append(mongo)
            env["MONGODB_URI"] = mongo.uri
            server = mongo.server.command if mongo.server else "SecantusDB"
            say(f"embedded database ({server}) at {mongo.uri}, data in {mongo.data_dir}")

        # kafka
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if bootstrap:
            if not broker_ready(bootstrap, timeout=5):
                raise ServiceError(f"Kafka is not reachable at {bootstrap}")
        else:
            try:
                kafka = LocalKafka(
                    var / "kafka",
                    cfg.local.kafka_port,
                    cfg.local.kafka_controller_port,
                    var / "kafka-libs",
                ).start()
                stack.append(kafka)
                bootstrap = kafka.bootstrap_servers
            except ToolMissing as exc:
                say(f"no local Kafka ({exc}); bundled alerts will be stored directly")
        if bootstrap:
            env["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
            say(f"Kafka at {bootstrap}")

        # API: on 127.0.0.1, with a random JWT secret kept in var/
        env.update(local_api_env(cfg, var))
        os.environ.update(env)
        load_config.cache_clear()
        cfg = load_config()
        api = ApiServer(cfg, cfg.server.port, logs / "api.log", env, host=cfg.server.host).start()
        stack.append(api)
        say(
            f"API on http://127.0.0.1:{cfg.server.port} (docs at /docs/api, admin user '{cfg.server.admin_username}')"
        )

        # ingester + alerts
        if bootstrap:
            args = [sys.executable, "-m", "ingester"] + [f"--survey={s}" for s in SURVEYS]
            ingester = start_process(args, logs / "ingester.log", cwd=ROOT, env=env)
            stack.append(ingester)
            wait_for_ingester(cfg, ingester, logs / "ingester.log")
            if replay:
                from ingester.replay import replay as replay_alerts

                counts = replay_alerts(bootstrap, bundled_alerts())
                say(
                    f"replayed {sum(counts.values())} bundled alerts to {len(counts)} nightly topics"
                )
        elif replay:
            from ingester.replay import ingest_files

            stored = ingest_files(cfg, bundled_alerts())
            say(f"stored bundled alerts directly: {stored}")

        api_url = f"http://127.0.0.1:{cfg.server.port}"
        state = write_instance(var, LocalInstance(os.getpid(), mongo_uri(cfg), bootstrap, api_url))
        say(f"up. Other commands use this instance ({state}).")
        say("Ctrl-C (or ./kowalski.py down --local) stops everything.")
        while not stop.wait(1.0):
            for item in stack:
                if isinstance(item, subprocess.Popen) and item.poll() is not None:
                    raise ServiceError(
                        f"ingester exited with code {item.returncode}; see {logs / 'ingester.log'}"
                    )
                if isinstance(item, ApiServer) and item.process and item.process.poll() is not None:
                    raise ServiceError(f"the API exited; see {logs / 'api.log'}")
        return 0
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        remove_instance(var, os.getpid())
        say("stopping")
        for item in reversed(stack):
            if isinstance(item, subprocess.Popen):
                stop_process(item, timeout=60)
            else:
                item.stop()  # type: ignore[attr-defined]
        pid_file(cfg).unlink(missing_ok=True)


def stop_local() -> int:
    cfg = load_config()
    path = pid_file(cfg)
    if not path.exists():
        print("error: no local Kowalski is running (no pid file)", file=sys.stderr)
        return 1
    pid = int(path.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        remove_instance(var_dir(cfg), pid)
        say("it had already stopped")
        return 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            remove_instance(var_dir(cfg), pid)
            say("stopped")
            return 0
        time.sleep(0.5)
    print(f"error: process {pid} did not stop within 120 s", file=sys.stderr)
    return 1
