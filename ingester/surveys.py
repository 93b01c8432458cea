"""What differs between the alert streams (ZTF, PGIR, WINTER, TURBO): names, keys, cutouts."""

from __future__ import annotations

from dataclasses import dataclass

from kowalski.config import Config


@dataclass(frozen=True)
class Survey:
    name: str  # instrument key in config (ZTF, PGIR, WNTR, TURBO)
    key: str  # lower-case key of collections in config (alerts_<key>)
    object_key: str  # objectId, or objectid for WINTER
    cutouts: tuple[str, str, str]
    fp_hists: bool  # stream carries forced photometry
    programids: bool  # candidate.programid governs who may see the alert
    history_days: float  # window of prv_candidates the filter stages keep

    def alerts_collection(self, cfg: Config) -> str:
        return cfg.database.collections[f"alerts_{self.key}"]

    def aux_collection(self, cfg: Config) -> str:
        return cfg.database.collections[f"alerts_{self.key}_aux"]


CAMEL = ("cutoutScience", "cutoutTemplate", "cutoutDifference")
SURVEYS = {
    "ZTF": Survey("ZTF", "ztf", "objectId", CAMEL, True, True, 365.0),
    "PGIR": Survey("PGIR", "pgir", "objectId", CAMEL, False, False, 1000.0),
    "WNTR": Survey(
        "WNTR",
        "wntr",
        "objectid",
        ("cutout_science", "cutout_template", "cutout_difference"),
        False,
        False,
        1000.0,
    ),
    "TURBO": Survey("TURBO", "turbo", "objectId", CAMEL, False, True, 365.0),
}

TOPIC_PREFIXES = {"ztf_": "ZTF", "pgir_": "PGIR", "winter_": "WNTR", "turbo_": "TURBO"}


def survey_for_topic(topic: str) -> Survey:
    for prefix, name in TOPIC_PREFIXES.items():
        if topic.startswith(prefix):
            return SURVEYS[name]
    raise ValueError(f"no survey for topic {topic!r} (expected one of {sorted(TOPIC_PREFIXES)})")
