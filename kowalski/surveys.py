"""The survey registry: everything that differs between alert streams lives here, once.

Each entry says how a survey's alerts are named on Kafka, keyed, stored, shown and protected.
The rest of the system (ingester stages, replay, the local supervisor, the API's cutouts, data
rights and filters) derives its behaviour from these entries; adding a survey is one entry here
plus, where its packets need one, a decoder.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# how a stored cutout image is turned to north-up / east-left, as upstream shows them
Orientation = Literal["flipud", "rot270_fliplr", "none"]
# how cutout fields are named in a survey's alerts: cutoutScience or cutout_science
CutoutNaming = Literal["camel", "snake"]
# who may see an alert: everyone, or users holding the alert's programid
Rights = Literal["public", "programid"]
# how packets arrive: Avro object container files (schema embedded), or Confluent wire format
# (byte 0, 4-byte big-endian schema id, schemaless Avro; the schema comes from a registry)
Framing = Literal["container", "confluent"]
# which document builder turns a decoded record into archive documents (ingester/shapes.py)
Shape = Literal["ztf", "lsst", "decam"]
JD_UNIX_EPOCH = 2440587.5


ANY_STREAM = "*"  # the stream label of surveys whose points all go to one stream


@dataclass(frozen=True)
class SkyPortalSpec:
    """How a survey is posted to SkyPortal (the broker feed, ingester/skyportal/stage.py).

    Streams follow upstream's matching rules: ZTF's are found by their exact names, each carrying
    some programids (`programid_streams`); every other survey posts to the first stream whose name
    contains one of `stream_tokens` (case-sensitively, as upstream's PGIR and TURBO brokers do,
    unless `tokens_any_case`, as upstream's WINTER broker does for "WNTR"/"WINTER")."""

    instrument: str  # instrument name on SkyPortal
    filters: Mapping[Any, str] | None = None  # band -> SkyPortal filter; None: str(band)
    default_filter: str | None = None  # the filter of any band not in `filters`; None: drop it
    band_key: str = "fid"  # the point field holding its band
    # None: points carry magnitudes (magpsf/sigmapsf, posted as µJy fluxes at zp 23.9); else
    # they carry psfFlux/psfFluxErr in nJy, posted as they are with this zero point (Rubin's 31.4)
    flux_zp: float | None = None
    programid_streams: Mapping[str, tuple[int, ...]] | None = None
    stream_tokens: tuple[str, ...] = ()
    tokens_any_case: bool = False

    def filter_of(self, band: Any) -> str | None:
        """A point's SkyPortal filter (None: the point is not posted)."""
        if self.filters is None:
            return None if band is None else str(band)
        return self.filters.get(band, self.default_filter)

    def stream_ids(self, streams: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """{stream label: SkyPortal stream id} from `GET /api/streams` (labels: ZTF's stream
        names, else ANY_STREAM)."""
        by_name = {str(s.get("name")): int(s["id"]) for s in streams if "id" in s}
        if self.programid_streams is not None:
            return {name: sid for name, sid in by_name.items() if name in self.programid_streams}
        for name, sid in by_name.items():
            if any(self._contains(name, token) for token in self.stream_tokens):
                return {ANY_STREAM: sid}
        return {}

    def _contains(self, name: str, token: str) -> bool:
        if self.tokens_any_case:
            return token.lower() in name.lower().strip()
        return token in name

    def stream_labels(self) -> tuple[str, ...]:
        """The labels every one of which must be mapped to a stream."""
        return tuple(self.programid_streams or ()) or (ANY_STREAM,)

    def stream_of(self, programid: Any) -> str | None:
        """The label of the stream a point of this programid goes to (None: not posted)."""
        if self.programid_streams is None:
            return ANY_STREAM
        return next((n for n, ids in self.programid_streams.items() if programid in ids), None)

    def stream_rule(self) -> str:
        """The matching rule, in words (for errors and `feed status`)."""
        if self.programid_streams is not None:
            return "streams named " + ", ".join(repr(n) for n in self.programid_streams)
        case = "any case" if self.tokens_any_case else "case-sensitive"
        return f"a stream whose name contains {' or '.join(map(repr, self.stream_tokens))} ({case})"


@dataclass(frozen=True)
class Survey:
    name: str  # registry key, also the instrument key in config (ZTF, PGIR, WNTR, TURBO, LSST)
    key: str  # lower-case key: collections `alerts_<key>`, cutout routes `/api/cutouts/<key>`
    # nightly topics `<prefix>_YYYYMMDD`; versioned ones `<prefix><schema major>` (lsst-alerts-v11)
    topic_prefix: str
    object_key: str  # the object identifier field of an alert (objectId; objectid for WINTER)
    # the stored field holding an alert's unique detection id (LSST: candid = the diaSourceId)
    detection_key: str = "candid"
    fp_hists: bool = False  # the stream carries forced photometry
    topic_per_programid: bool = False  # nightly topics are split by programid (ZTF)
    cutout_naming: CutoutNaming = "camel"
    orientation: Orientation = "none"
    rights: Rights = "public"
    data_folder: str = ""  # folder of the bundled real packets under data/
    nightly: bool = True  # topics per night (ZTF), else per schema major version (Rubin)
    framing: Framing = "container"
    shape: Shape = "ztf"
    schema_folder: str = ""  # bundled writer schemas (confluent framing) under data/
    # the fields identifying one point of an object's history (merged without duplicates by them)
    history_key: tuple[str, ...] = ("jd", "fid", "candid")
    # first part of the writer schemas' full names (lsst.v7_1.alert); default: the topic prefix
    schema_name: str = ""
    skyportal: SkyPortalSpec | None = None  # None: the broker feed does not post this survey
    enabled_by_default: bool = False  # ingested unless `enabled.<key>` says otherwise
    # rights "programid": every programid of the survey, and those any user may see
    programids: tuple[int, ...] = ()
    public_programids: tuple[int, ...] = ()

    @property
    def schema_family(self) -> str:
        return self.schema_name or self.topic_prefix

    @property
    def alerts_key(self) -> str:
        return f"alerts_{self.key}"

    @property
    def aux_key(self) -> str:
        return f"alerts_{self.key}_aux"

    @property
    def topic_pattern(self) -> str:
        """The default subscription (librdkafka regex, hence no \\d)."""
        if not self.nightly:
            return f"^{self.topic_prefix}[0-9]+"
        suffix = "_programid[123]" if self.topic_per_programid else ""
        return f"^{self.topic_prefix}_[0-9]{{8}}{suffix}"

    def subscription(self, configured: Mapping[str, str]) -> str:
        """The topic pattern to subscribe to: `kafka.topics[<name>]` where set, else the default."""
        return configured.get(self.name, self.topic_pattern)

    def alerts_collection(self, cfg: Any) -> str:
        return str(cfg.database.collections[self.alerts_key])

    def aux_collection(self, cfg: Any) -> str:
        return str(cfg.database.collections[self.aux_key])

    def topic(self, alert: Mapping[str, Any]) -> str:
        """The topic the survey publishes an alert document to: `<prefix>_YYYYMMDD` (UT night of
        candidate.jd, `_programid<N>` for ZTF), or `<prefix><major>` from its schemavsn (LSST)."""
        if not self.nightly:
            return f"{self.topic_prefix}{str(alert['schemavsn']).split('.')[0]}"
        candidate = alert["candidate"]
        name = f"{self.topic_prefix}_{night(candidate['jd'])}"
        if self.topic_per_programid:
            name += f"_programid{candidate['programid']}"
        return name

    def cutout_field(self, cutout: str) -> str:
        """`science` -> the alert field holding that cutout."""
        return f"cutout_{cutout}" if self.cutout_naming == "snake" else f"cutout{cutout.title()}"

    @property
    def programid_rights(self) -> bool:
        return self.rights == "programid"


def night(jd: float) -> str:
    """The UT date (YYYYMMDD) of a Julian date."""
    return (dt.datetime(1970, 1, 1) + dt.timedelta(days=jd - JD_UNIX_EPOCH)).strftime("%Y%m%d")


SURVEYS: dict[str, Survey] = {
    survey.name: survey
    for survey in (
        Survey(
            "ZTF",
            "ztf",
            "ztf",
            "objectId",
            fp_hists=True,
            topic_per_programid=True,
            orientation="flipud",
            rights="programid",
            data_folder="ztf_alerts",
            enabled_by_default=True,
            programids=(0, 1, 2, 3),
            public_programids=(1,),
            skyportal=SkyPortalSpec(
                "ZTF",
                {1: "ztfg", 2: "ztfr", 3: "ztfi"},
                programid_streams={
                    "ZTF Public": (1,),
                    "ZTF Public+Partnership": (2,),
                    "ZTF Public+Partnership+Caltech": (0, 3),
                },
            ),
        ),
        Survey(
            "PGIR",
            "pgir",
            "pgir",
            "objectId",
            orientation="rot270_fliplr",
            data_folder="other_alerts/pgir_alerts",
            skyportal=SkyPortalSpec("PGIR", {}, default_filter="cspjs", stream_tokens=("PGIR",)),
        ),
        Survey(
            "WNTR",
            "wntr",
            "winter",
            "objectid",
            cutout_naming="snake",
            data_folder="other_alerts/wntr_alerts",
            # fid 4 (dark) is not posted
            skyportal=SkyPortalSpec(
                "WINTER",
                {1: "ps1::y", 2: "2massj", 3: "2massh"},
                stream_tokens=("WNTR", "WINTER"),
                tokens_any_case=True,
            ),
        ),
        Survey(
            "TURBO",
            "turbo",
            "turbo",
            "objectId",
            orientation="flipud",
            data_folder="other_alerts/turbo_alerts",
            skyportal=SkyPortalSpec("TURBO", None, stream_tokens=("TURBO",)),
        ),
        Survey(
            "LSST",
            "lsst",
            "lsst-alerts-v",
            "objectId",  # the diaObjectId (ssObjectId for solar-system sources without one)
            fp_hists=True,
            data_folder="lsst_alerts",
            nightly=False,
            framing="confluent",
            shape="lsst",
            schema_folder="schemas/lsst",
            history_key=("diaSourceId",),
            schema_name="lsst",
            skyportal=SkyPortalSpec(
                "LSST",
                {b: f"lsst{b}" for b in "ugrizy"},
                band_key="band",
                flux_zp=31.4,
                stream_tokens=("LSST",),
                tokens_any_case=True,
            ),
        ),
        Survey(
            "DECAM",
            "decam",
            "decam",
            "objectId",
            fp_hists=True,
            data_folder="decam_alerts",
            shape="decam",
            schema_name="desirt",
            skyportal=SkyPortalSpec(
                "DECam",
                {b: f"des{b}" for b in "grizy"},
                band_key="band",
                flux_zp=31.4,
                stream_tokens=("DECAM",),
                tokens_any_case=True,
            ),
        ),
    )
}


class UnknownSurvey(LookupError):
    """A topic, key or collection that no registered survey claims."""


def survey_for_topic(topic: str, patterns: Mapping[str, str] | None = None) -> Survey:
    """The survey whose subscription pattern (configured `kafka.topics`, else the default) matches."""
    for survey in SURVEYS.values():
        if re.match(survey.subscription(patterns or {}), topic):
            return survey
    raise UnknownSurvey(f"no survey subscribes to topic {topic!r}")


def survey_for_key(key: str) -> Survey:
    """`ztf` / `ZTF` -> the ZTF entry."""
    for survey in SURVEYS.values():
        if key.lower() == survey.key:
            return survey
    raise UnknownSurvey(f"survey must be one of {[s.key for s in SURVEYS.values()]}, got {key!r}")


def survey_for_collection(collections: Mapping[str, str], name: str) -> Survey | None:
    """The survey whose alerts or aux collection is `name` (per `database.collections`)."""
    for survey in SURVEYS.values():
        if name in (collections.get(survey.alerts_key), collections.get(survey.aux_key)):
            return survey
    return None


def survey_of_path(path: Path) -> Survey:
    """The survey of a packet file, from the name of the data folder it lies in (`pgir_alerts`)."""
    parts = {part.lower() for part in path.parts}
    for survey in SURVEYS.values():
        if Path(survey.data_folder).name in parts:
            return survey
    folders = [Path(s.data_folder).name for s in SURVEYS.values()]
    raise UnknownSurvey(f"{path}: name the survey, or put the file under one of {folders}")


def bundled_packets(data_root: Path) -> list[Path]:
    """Every bundled real packet of every survey."""
    return sorted(
        path
        for survey in SURVEYS.values()
        for path in (data_root / survey.data_folder).rglob("*.avro")
    )
