"""Configuration: `config.defaults.yaml` deep-merged with `config.yaml`, then environment overrides,
validated once by a typed model. A wrong type or an unknown key raises `ConfigError` naming the key.

Environment overrides (applied in this order, later wins):
- ``KOWALSKI__<section>__<key>[__<key>...]=<YAML value>`` for any key,
- ``MONGODB_URI`` -> ``database.uri``,
- ``KAFKA_BOOTSTRAP_SERVERS`` -> ``kafka.bootstrap.servers`` and ``kafka.bootstrap.test.servers``,
- ``KOWALSKI_JWT_SECRET_KEY``, ``KOWALSKI_ADMIN_PASSWORD``, ``SKYPORTAL_TOKEN``.

The database and Kafka a command uses: ``MONGODB_URI`` / ``KAFKA_BOOTSTRAP_SERVERS``; else the running
`up --local` instance (its state file under ``local.var_dir``); else the configured servers
(`server_overrides`). ``Config.origin`` says which one was chosen, for error messages.

Default secrets: the API refuses to start with the JWT secret or admin password of
`config.defaults.yaml` (`check_secrets`), unless `server.insecure_dev: true` says this is a
development server; `up --local` binds 127.0.0.1 and uses a random secret kept in `var/`
(`local_api_env`). Likewise the entry points refuse a default or empty database password for a
database on another machine (`check_database_password`).

Why not `pydantic-settings`: its YAML and environment sources would replace `deep_merge` and
`env_overrides` (~40 lines), but not what they carry beyond that: upstream's dotted librdkafka key
names (`bootstrap.servers`) that an environment variable cannot spell, the four variables that
name a server (`server_overrides`, with `origin` for error messages), and the running `up --local`
instance's addresses. Revisit if those go.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import os
import secrets
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from kowalski.instance import read_instance, state_path
from kowalski.surveys import SURVEYS

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS_FILE = ROOT / "config.defaults.yaml"
USER_FILE = ROOT / "config.yaml"


class ConfigError(Exception):
    """Invalid configuration; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=False)


class Contact(_Strict):
    name: str
    email: str


# networks a sky map URL may point to although they are internal (server.skymap_fetch_allow)
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Server(_Strict):
    name: str
    version: str
    description: str
    host: str
    port: int = Field(ge=1, le=65535)
    processes: int = Field(ge=1)
    max_requests: int = Field(ge=0)
    timeout: int = Field(ge=1)
    admin_username: str = Field(min_length=1)
    admin_password: str = Field(min_length=1)
    JWT_SECRET_KEY: str = Field(min_length=1)
    JWT_ALGORITHM: Literal["HS256", "HS384", "HS512"]
    JWT_EXP_DELTA_SECONDS: int | None = Field(default=None, ge=1)
    # seconds a token is valid (takes precedence over JWT_EXP_DELTA_SECONDS); null: no expiry
    token_ttl: int | None = Field(default=None, ge=1)
    # private/loopback/link-local networks (CIDR) sky map URLs may still be fetched from
    skymap_fetch_allow: tuple[IPNetwork, ...] = ()
    client_max_size: int = Field(ge=1024)
    contact: Contact
    # allow the default JWT secret / admin password (a development server nobody else reaches)
    insecure_dev: bool = False


class ZTFMountain(_Strict):
    # the ZTF scheduler's trigger service (api/triggers.py)
    mountain_ip: str | None = None
    mountain_port: int | None = None


class ResultsStream(_Strict):
    """Publishing filter passes to Kafka (see README, "Results stream")."""

    enabled: bool = True
    compression: Literal["zstd", "lz4", "gzip", "snappy", "none"] = "zstd"
    # exactly once with Kafka transactions; false (or a broker without them): at least once
    transactions: bool = True
    # stable per ingester instance; default kowalski-results-<group>-<hostname>
    transactional_id: str | None = None


class Kafka(_Strict):
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        alias="default.topic.config.auto.offset.reset"
    )
    group: str = Field(min_length=1)
    bootstrap_servers: str = Field(alias="bootstrap.servers", min_length=1)
    bootstrap_test_servers: str = Field(alias="bootstrap.test.servers", min_length=1)
    topics: dict[str, str]
    results_topic: str = "kowalski_filter_{filter_id}"
    results: ResultsStream = ResultsStream()
    # librdkafka's max.poll.interval.ms of the ingester's consumer (its session timeout is 10 s);
    # the results publisher's blocking calls each wait at most a quarter of it
    max_poll_interval_ms: int = Field(default=900_000, ge=10_000)

    @field_validator("results_topic")
    @classmethod
    def _results_topic(cls, value: str) -> str:
        try:
            names = {value.format(filter_id=f, survey=s) for f in (1, 2) for s in ("a", "b")}
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"only {{filter_id}} and {{survey}} may be substituted ({exc})"
            ) from None
        if len(names) == 1:
            raise ValueError("must contain {filter_id} (a topic per filter) or {survey}")
        return value

    # Confluent schema registry for Confluent-framed streams (LSST); null: bundled schemas only
    schema_registry_url: str | None = None
    schema_registry_timeout_s: float = Field(default=5.0, gt=0)


# Kowalski's own collections (not the surveys' alerts): the keys of `database.collections`
SystemCollection = Literal[
    "users",
    "filters",
    "queries",
    "dead_letters",
    "filter_runs",
    "filter_backfills",
    "filter_backfill_passes",
    "filter_backfill_slots",
    "skymaps",
    "handoffs",
    "results_outbox",
    "skyportal_outbox",
    "skyportal_objects",
    "skyportal_setup",
]


class IndexSpec(_Strict):
    name: str
    fields: list[tuple[str, int | str]]
    unique: bool = False


# the upstream filter stages the code fills at run time, by name, and the operator each must be
FILTER_MATCH = "match"
FILTER_HISTORY = "history"
FILTER_STAGE_OPERATORS = {FILTER_MATCH: "$match", FILTER_HISTORY: "$project"}


class Aliases(_Strict):
    """Cross-survey aliases: objects of paired surveys within `radius_arcsec` are linked."""

    radius_arcsec: float = Field(default=1.5, gt=0)
    pairs: list[tuple[str, str]] = []

    def partners(self, survey: str) -> list[str]:
        """The surveys whose objects `survey`'s objects are linked to."""
        out = [b if a == survey else a for a, b in self.pairs if survey in (a, b)]
        return sorted(set(out) - {survey})


class Database(_Strict):
    uri: str | None = None
    max_pool_size: int = Field(ge=1)
    max_wired_tiger_cache: float | str | None = None
    host: str
    port: int = Field(ge=1, le=65535)
    replica_set: str | None = None
    db: str = Field(min_length=1)
    admin_username: str
    admin_password: str
    username: str
    password: str
    srv: bool = False
    build_indexes: bool = True
    # collection names by key: the system's own (`collection(key)`) and the surveys' alerts
    # (`alerts_<key>`, `alerts_<key>_aux`, see kowalski/surveys.py)
    collections: dict[str, str]
    indexes: dict[str, list[IndexSpec]]
    filters: dict[str, list[dict[str, Any]]]
    xmatch: dict[str, dict[str, XMatchCatalog]]
    aliases: Aliases = Aliases()
    _filter_stage_names: dict[str, list[str]] = PrivateAttr(default_factory=dict)

    def collection(self, key: SystemCollection) -> str:
        """The name of one of Kowalski's own collections (renamed in `collections`, else the
        key itself)."""
        return self.collections.get(key, key)

    @model_validator(mode="wrap")
    @classmethod
    def _named_filter_stages(
        cls, data: Any, handler: ModelWrapValidatorHandler[Database]
    ) -> Database:
        """`filters` is configured per collection as an ordered mapping name -> stage; the model
        keeps the stage list (the pipeline) and the names, by which the code addresses stages."""
        names: dict[str, list[str]] = {}
        if isinstance(data, dict) and isinstance(data.get("filters"), dict):
            data = dict(data)
            data["filters"], names = _split_named_stages(data["filters"])
        model = handler(data)
        model._filter_stage_names = names or model._filter_stage_names
        return model

    def filter_stage_index(self, catalog: str, name: str) -> int:
        """Position of the upstream filter stage `name` of `catalog` in its pipeline."""
        return self._filter_stage_names[catalog].index(name)

    @field_validator("collections")
    @classmethod
    def _required_collections(cls, value: dict[str, str]) -> dict[str, str]:
        missing = {"users", "filters", "alerts_ztf", "alerts_ztf_aux"} - set(value)
        if missing:
            raise ValueError(f"missing required collections: {sorted(missing)}")
        return value


def _split_named_stages(
    filters: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Per collection: `{name: stage, ...}` -> (the stage list, the names). Each collection must
    name its `match` stage (a `$match`) and its `history` stage (a `$project`)."""
    stages: dict[str, Any] = {}
    names: dict[str, list[str]] = {}
    for catalog, named in filters.items():
        if not isinstance(named, dict):
            raise ValueError(
                f"filters.{catalog}: name the stages (a mapping name -> stage), "
                f"with {sorted(FILTER_STAGE_OPERATORS)}"
            )
        for name, operator in FILTER_STAGE_OPERATORS.items():
            stage = named.get(name)
            if not isinstance(stage, dict) or operator not in stage:
                raise ValueError(f"filters.{catalog}.{name} must be a {operator} stage")
        stages[catalog] = list(named.values())
        names[catalog] = [str(name) for name in named]
    return stages, names


class XMatchCatalog(_Strict):
    cone_search_radius: float = Field(gt=0)
    cone_search_unit: Literal["arcsec", "arcmin", "deg", "rad"]
    filter: dict[str, Any] = {}
    projection: dict[str, Any] = {}
    use_distance: bool = False
    distance_value: str | None = None
    distance_method: Literal["redshift", "mpc"] | None = None
    cm_at_distance: float | None = None
    cm_low_distance: float | None = None


class MLModel(_Strict):
    triplet: bool
    feature_names: list[str] | bool
    version: str
    order: list[Literal["features", "triplet"]] = ["features", "triplet"]
    onnx: str | None = None
    h5: str | None = None
    feature_norms: dict[str, float] | None = None


class InstrumentML(_Strict):
    models: dict[str, MLModel] = {}


class ML(_Strict):
    backend: Literal["onnx", "tensorflow"]
    models_path: str
    batch_size: int = Field(default=16, ge=1)
    # ONNX Runtime threads per model session (0: one per core). One each: the dask workers
    # already run in parallel, and more threads oversubscribe the cores (see README, Benchmark)
    intra_op_threads: int = Field(default=1, ge=0)
    inter_op_threads: int = Field(default=1, ge=0)
    # the models per survey: written as upstream does, one key per survey name beside the
    # settings above (`ml.ZTF.models`), validated against the survey registry
    surveys: dict[str, InstrumentML] = {}

    @model_validator(mode="before")
    @classmethod
    def _survey_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        settings = {k: v for k, v in data.items() if k not in SURVEYS}
        per_survey = {k: v for k, v in data.items() if k in SURVEYS}
        return {**settings, "surveys": {**(settings.pop("surveys", None) or {}), **per_survey}}

    def models_of(self, survey: str) -> dict[str, MLModel]:
        return self.surveys.get(survey, InstrumentML()).models


class SkyPortal(_Strict):
    protocol: Literal["http", "https"]
    host: str
    port: int = Field(ge=1, le=65535)
    username: str
    token: str | None = None
    # the broker feed (ingester/skyportal/): HTTP behaviour and outbox delivery
    timeout_s: float = Field(default=5.0, gt=0)
    photometry_timeout_s: float = Field(default=15.0, gt=0)
    followup_timeout_s: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=8, ge=1)
    retries: int = Field(default=5, ge=0)
    backoff_s: float = Field(default=2.0, ge=0)
    max_backoff_s: float = Field(default=300.0, gt=0)
    poll_s: float = Field(default=1.0, gt=0)


class Dask(_Strict):
    scheduler_address: str | None = None
    host: str
    scheduler_port: int
    dashboard_address: str | None
    n_workers: int = Field(ge=1)
    threads_per_worker: int = Field(ge=1)
    lifetime: str | None = None
    lifetime_stagger: str | None = None
    lifetime_restart: bool = True


class Ingester(_Strict):
    batch_size: int = Field(ge=1)
    batch_timeout_s: float = Field(gt=0)
    filter_max_time_ms: int = Field(ge=1)
    # the ingester's /metrics, /healthz and /readyz (kowalski/metrics.py); port 0: not served
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9309, ge=0, le=65535)
    # how often librdkafka reports the consumer's lag to the metrics
    statistics_interval_ms: int = Field(default=5000, ge=100)


class Backfill(_Strict):
    """Filter back-fills over the archive (`kowalski/backfill.py`)."""

    batch_size: int = Field(default=256, ge=1)  # alerts per filter run (and checkpoint)
    max_alerts: int = Field(default=100_000, ge=1)  # per job, for users who are not admins
    max_jobs_per_user: int = Field(default=2, ge=1)  # queued or running at once
    lease_s: float = Field(default=300.0, gt=0)  # a runner silent this long is taken over
    poll_s: float = Field(default=5.0, gt=0)  # how often an idle runner looks for jobs
    in_ingester: bool = True  # run jobs in a thread of `python -m ingester`
    explain_max_alerts: int = Field(default=5000, ge=1)  # largest explain sample


class Misc(_Strict):
    broker: bool
    supported_penquins_versions: list[str]
    max_time_ms: int = Field(ge=1)
    # the most a non-admin query with a regular expression may run (backstop of api/safety.py)
    regex_max_time_ms: int = Field(default=10000, ge=1)
    # queries one user may run at a time in one API worker; more wait up to their max_time_ms
    max_concurrent_queries: int = Field(default=8, ge=1)
    logging_level: Literal["debug", "info", "warning", "error"]


class Local(_Strict):
    var_dir: str
    mongo_port: int = Field(ge=1, le=65535)
    kafka_port: int = Field(ge=1, le=65535)
    kafka_controller_port: int = Field(ge=1, le=65535)


class Config(_Strict):
    server: Server
    ztf: ZTFMountain
    kafka: Kafka
    database: Database
    ml: ML
    skyportal: SkyPortal
    dask: Dask
    ingester: Ingester
    backfill: Backfill = Backfill()
    misc: Misc
    local: Local
    # surveys ingested, by the registry's lower-case key (`enabled.lsst: true`); a survey not
    # named keeps its registry default (ZTF on, the others off)
    enabled: dict[str, bool] = {}
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("enabled")
    @classmethod
    def _enabled_surveys(cls, value: dict[str, bool]) -> dict[str, bool]:
        keys = {survey.key: survey for survey in SURVEYS.values()}
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise ValueError(f"unknown survey(s) {unknown}; the surveys are {sorted(keys)}")
        return {key: value.get(key, survey.enabled_by_default) for key, survey in keys.items()}

    def enabled_surveys(self) -> list[str]:
        """The names (registry order) of the surveys this instance ingests."""
        return [name for name, survey in SURVEYS.items() if self.enabled[survey.key]]

    def path(self, relative: str) -> Path:
        """Resolve a path from the config relative to the repository root."""
        p = Path(relative)
        return p if p.is_absolute() else ROOT / p

    def origin(self, service: Literal["database", "kafka"]) -> str:
        """Where the address of `service` came from (see `server_overrides`)."""
        return self._origins.get(service, CONFIGURED[service])


Database.model_rebuild()


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return `base` updated recursively with `override` (neither is modified)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path.name}: not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(data, dict) or not isinstance(data.get("kowalski", {}), dict):
        raise ConfigError(f"{path.name}: expected a mapping under the root key 'kowalski'")
    section: dict[str, Any] = data.get("kowalski", {})
    return section


def _set_dotted(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"environment override: {'.'.join(keys)} is not under a mapping")
    node[keys[-1]] = value


def env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """Collect configuration overrides from environment variables."""
    tree: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if name.startswith("KOWALSKI__"):
            keys = [k for k in name[len("KOWALSKI__") :].split("__") if k]
            _set_dotted(tree, keys, yaml.safe_load(raw) if raw else None)
    named = {
        "MONGODB_URI": [["database", "uri"]],
        "KAFKA_BOOTSTRAP_SERVERS": [
            ["kafka", "bootstrap.servers"],
            ["kafka", "bootstrap.test.servers"],
        ],
        "KOWALSKI_JWT_SECRET_KEY": [["server", "JWT_SECRET_KEY"]],
        "KOWALSKI_ADMIN_PASSWORD": [["server", "admin_password"]],
        "SKYPORTAL_TOKEN": [["skyportal", "token"]],
    }
    for env_name, targets in named.items():
        if environ.get(env_name):
            for keys in targets:
                _set_dotted(tree, keys, environ[env_name])
    return tree


CONFIGURED = {
    "database": "the configured server, database.* in config.yaml/config.defaults.yaml",
    "kafka": "the configured server, kafka.bootstrap.servers in config.yaml/config.defaults.yaml",
}


def _first_set(environ: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((name for name in names if environ.get(name)), None)


def server_overrides(
    merged: dict[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Which database and Kafka to use: an address from the environment; else the running
    `up --local` instance; else the configured one. Returns overrides and each address's origin."""
    db_env = _first_set(environ, ("MONGODB_URI", "KOWALSKI__database__uri"))
    kafka_env = _first_set(
        environ, ("KAFKA_BOOTSTRAP_SERVERS", "KOWALSKI__kafka__bootstrap.servers")
    )
    origins = {
        "database": db_env or CONFIGURED["database"],
        "kafka": kafka_env or CONFIGURED["kafka"],
    }
    local = merged.get("local")
    var_dir = local.get("var_dir") if isinstance(local, dict) else None
    instance = read_instance(ROOT / var_dir) if isinstance(var_dir, str) else None
    if instance is None:
        return {}, origins
    where = f"the running local instance (pid {instance.pid}, {state_path(ROOT / str(var_dir))})"
    tree: dict[str, Any] = {}
    if not db_env:
        tree["database"] = {"uri": instance.mongodb_uri}
        origins["database"] = where
    if not kafka_env and instance.kafka_bootstrap_servers:
        servers = instance.kafka_bootstrap_servers
        tree["kafka"] = {"bootstrap.servers": servers, "bootstrap.test.servers": servers}
        origins["kafka"] = where
    return tree, origins


# upstream settings this Kowalski does not use (no session cookies, Kafka run from pinned jars,
# one consumer group per ingester, no SSH tunnel to the ZTF scheduler): refused with this hint
RETIRED_KEYS = frozenset(
    {
        "server.SECRET_KEY",
        "server.fernet_key",
        "kafka.kafka_version",
        "kafka.scala_version",
        "kafka.processes_per_topic",
        "misc.openapi_validate",
        "ztf.mountain_username",
        "ztf.mountain_password",
        "ztf.mountain_bind_ip",
        "ztf.mountain_bind_port",
    }
)


def retired_hint(key: str) -> str:
    top = ".".join(key.split(".")[:2])
    return (
        " (an upstream setting this Kowalski does not use: remove it)"
        if top in RETIRED_KEYS
        else ""
    )


def _format_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"config error: unknown key kowalski.{key}{retired_hint(key)}"
    value = first.get("input")
    shown = "" if isinstance(value, dict | list) else f" (got {value!r})"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"config error: kowalski.{key}: {first['msg']}{shown}{more}"


def build_config(files: list[Path] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Merge defaults, the given YAML files (default: config.yaml if present) and env, validate."""
    merged = _read_yaml(DEFAULTS_FILE)
    for path in files if files is not None else [USER_FILE]:
        if path.exists():
            merged = deep_merge(merged, _read_yaml(path))
    env = dict(os.environ if environ is None else environ)
    merged = deep_merge(merged, env_overrides(env))
    servers, origins = server_overrides(merged, env)
    merged = deep_merge(merged, servers)
    try:
        cfg = Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
    cfg._origins = origins
    return cfg


# ---------------------------------------------------------------- database credentials
# A default or empty database password is refused by the entry points (`load_config_or_exit`)
# unless the database is on this machine (the embedded server of `up --local` and of the tests,
# a developer's mongod) or `server.insecure_dev` is true.

PASSWORDLESS_MECHANISMS = ("MONGODB-X509", "MONGODB-AWS", "MONGODB-OIDC", "GSSAPI")


def _uri_host(entry: str) -> str:
    if entry.startswith("["):  # [::1]:27017
        return entry[1 : entry.find("]")]
    return entry.rsplit(":", 1)[0] if entry.count(":") == 1 else entry


def database_credentials(cfg: Config) -> tuple[list[str], str | None]:
    """The database's servers (host:port) and the password the programs log in with (None: no
    password needed, e.g. X.509), from `database.uri` (MONGODB_URI) or host and credentials."""
    db = cfg.database
    if not db.uri:
        return [f"{db.host}:{db.port}"], db.admin_password
    parts = urllib.parse.urlsplit(db.uri)
    userinfo, _, servers = parts.netloc.rpartition("@")
    mechanism = urllib.parse.parse_qs(parts.query).get("authMechanism", [""])[0]
    password = urllib.parse.unquote(userinfo.partition(":")[2])
    return servers.split(","), None if mechanism.upper() in PASSWORDLESS_MECHANISMS else password


def is_local_host(server: str) -> bool:
    """Loopback addresses and unix sockets: a database only this machine reaches."""
    host = _uri_host(server)
    if host == "localhost" or host.startswith(("/", "%2F", "%2f")):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_database_password(cfg: Config) -> None:
    """Refuse a default (config.defaults.yaml's) or empty database password for a database
    other machines may reach, unless `server.insecure_dev` is set."""
    servers, password = database_credentials(cfg)
    if password is None or cfg.server.insecure_dev or all(map(is_local_host, servers)):
        return
    default = _read_yaml(DEFAULTS_FILE).get("database", {}).get("admin_password")
    if password and password != default:
        return
    what = "an empty" if not password else "the default (config.defaults.yaml)"
    raise ConfigError(
        f"refusing to use the database at {','.join(servers)} with {what} password: set "
        "MONGO_INITDB_ROOT_PASSWORD (docker compose), the password in MONGODB_URI or "
        "database.admin_password; a default or empty one is accepted only for a database on "
        "this machine (127.0.0.1) or with server.insecure_dev: true"
    )


def user_files() -> list[Path] | None:
    """The user's configuration: KOWALSKI_CONFIG if set, else (None) config.yaml."""
    extra = os.environ.get("KOWALSKI_CONFIG")
    return [Path(extra)] if extra else None


@functools.cache
def load_config() -> Config:
    """The process-wide configuration (config.yaml + environment), validated once."""
    return build_config(user_files())


def load_config_or_exit() -> Config:
    """For entry points: the configuration, its database password checked
    (`check_database_password`), or exit with its one-line error."""
    import sys

    try:
        cfg = load_config()
        check_database_password(cfg)
        return cfg
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def default_secrets(cfg: Config) -> list[str]:
    """The settings of `cfg` that still hold the public defaults of config.defaults.yaml."""
    defaults = _read_yaml(DEFAULTS_FILE).get("server", {})
    return [
        key
        for key in ("JWT_SECRET_KEY", "admin_password")
        if getattr(cfg.server, key) == defaults.get(key)
    ]


def check_secrets(cfg: Config) -> None:
    """Refuse the public default JWT secret or admin password (anyone could forge an admin
    token or log in) unless `server.insecure_dev` is set."""
    found = default_secrets(cfg)
    if found and not cfg.server.insecure_dev:
        raise ConfigError(
            f"refusing to serve with the default server.{' and server.'.join(found)}: set "
            "KOWALSKI_JWT_SECRET_KEY / KOWALSKI_ADMIN_PASSWORD (or server.* in config.yaml), "
            "or server.insecure_dev: true for a development server"
        )
    check_secret_length(cfg)


MIN_SECRET_BYTES = 32


def check_secret_length(cfg: Config) -> None:
    """Outside development (`insecure_dev`, as `up --local` sets), a JWT secret short enough to
    guess offline from one token is refused."""
    if len(cfg.server.JWT_SECRET_KEY.encode()) < MIN_SECRET_BYTES and not cfg.server.insecure_dev:
        raise ConfigError(
            f"refusing to serve with a server.JWT_SECRET_KEY shorter than {MIN_SECRET_BYTES} "
            "bytes: set a long random one (e.g. python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(48))')"
        )


def local_api_env(cfg: Config, var: Path) -> dict[str, str]:
    """Environment for the API of `up --local`: a random JWT secret generated into `var/` on
    first start and reused after (unless one is configured); the default admin password is
    allowed because local mode binds 127.0.0.1."""
    env = {"KOWALSKI__server__host": "127.0.0.1", "KOWALSKI__server__insecure_dev": "true"}
    if "JWT_SECRET_KEY" in default_secrets(cfg):
        path = var / "jwt_secret"
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(48))
        env["KOWALSKI_JWT_SECRET_KEY"] = path.read_text().strip()
    return env
