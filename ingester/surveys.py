"""What differs between the alert streams (ZTF, PGIR, WINTER, TURBO): names, keys, forced photometry."""

from __future__ import annotations

from dataclasses import dataclass

from kowalski.config import Config


@dataclass(frozen=True)
class Survey:
    name: str  # instrument key in config (ZTF, PGIR, WNTR, TURBO)
    key: str  # lower-case key of collections in config (alerts_<key>)
    object_key: str  # objectId, or objectid for WINTER
    fp_hists: bool  # stream carries forced photometry

    def alerts_collection(self, cfg: Config) -> str:
        return cfg.database.collections[f"alerts_{self.key}"]

    def aux_collection(self, cfg: Config) -> str:
        return cfg.database.collections[f"alerts_{self.key}_aux"]


SURVEYS = {
    "ZTF": Survey("ZTF", "ztf", "objectId", fp_hists=True),
    "PGIR": Survey("PGIR", "pgir", "objectId", fp_hists=False),
    "WNTR": Survey("WNTR", "wntr", "objectid", fp_hists=False),
    "TURBO": Survey("TURBO", "turbo", "objectId", fp_hists=False),
}

TOPIC_PREFIXES = {"ztf_": "ZTF", "pgir_": "PGIR", "winter_": "WNTR", "turbo_": "TURBO"}


def survey_for_topic(topic: str) -> Survey:
    for prefix, name in TOPIC_PREFIXES.items():
        if topic.startswith(prefix):
            return SURVEYS[name]
    raise ValueError(f"no survey for topic {topic!r} (expected one of {sorted(TOPIC_PREFIXES)})")
