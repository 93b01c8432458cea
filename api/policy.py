"""Data rights: one `DataRights` object per request (built from the user by the auth middleware)
that every query type and cutouts ask what the user may read.

Restricted collections (of surveys whose registry entry has `rights="programid"`, for users who
may not see every programid of that survey; today ZTF):
- alerts (`ZTF_alerts`): only alerts whose `candidate.programid` is permitted exist for the user;
- aux (`ZTF_alerts_aux`): only the permitted points of `prv_candidates` and `fp_hists` exist.
Back-fill passes (`filter_backfill_passes`): a user who is not an admin sees only the records of
their own jobs.
The restriction is applied first; the user's filter, projection and stages only ever see its
result, so no filter can test hidden points (no yes/no oracles through counts or `$or`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from api.auth import User, current_user
from api.models import collection_name
from api.responses import Forbidden
from api.safety import referenced_collections
from api.state import CONFIG
from kowalski.backfill import passes_collection
from kowalski.config import Config
from kowalski.db import system_collection_names
from kowalski.surveys import Survey, survey_for_collection

HISTORY_ARRAYS = ("prv_candidates", "fp_hists")
Stage = dict[str, Any]


@dataclass(frozen=True)
class DataRights:
    user: User
    cfg: Config

    # ------------------------------------------------------------------ who and what

    @property
    def admin(self) -> bool:
        return self.user.admin

    def programids(self, survey: str) -> list[int]:
        return self.user.allowed_programids(survey)

    @property
    def protected(self) -> frozenset[str]:
        return system_collection_names(self.cfg)

    def restricting_survey(self, catalog: str) -> Survey | None:
        """The survey whose programid rights hide part of `catalog` from this user, if any."""
        survey = survey_for_collection(self.cfg.database.collections, catalog)
        if survey is None or not survey.programid_rights:
            return None
        return None if self.user.sees_everything(survey.name) else survey

    def owned_clause(self, catalog: str) -> dict[str, Any] | None:
        """For collections of per-user records (back-fill passes): a non-admin sees only the
        records of their own jobs (None: no such restriction)."""
        if self.admin or catalog != passes_collection(self.cfg):
            return None
        return {"owner": self.user.username}

    def restricted(self, catalog: str) -> bool:
        """Whether this user sees only part of `catalog`."""
        return (
            self.restricting_survey(catalog) is not None or self.owned_clause(catalog) is not None
        )

    def is_aux(self, catalog: str) -> bool:
        survey = survey_for_collection(self.cfg.database.collections, catalog)
        return survey is not None and self.cfg.database.collections.get(survey.aux_key) == catalog

    # ------------------------------------------------------------------ validation

    def check_catalog(self, catalog: Any, field: str = "query.catalog") -> str:
        name = collection_name(catalog, field)
        if name in self.protected and not self.admin:
            raise Forbidden(f"Forbidden: {name} is a protected collection")
        return name

    def check_joins(self, pipeline: Sequence[Any]) -> None:
        """Collections a pipeline reads (at any depth) must be readable in full by this user."""
        for target in referenced_collections(pipeline):
            self.check_catalog(target, "query.pipeline")
            if self.restricted(target):
                raise Forbidden(
                    f"Forbidden: joining {target} needs access to every ZTF programid; "
                    f"query {target} directly instead"
                )

    # ------------------------------------------------------------------ restriction

    def document_clause(self, catalog: str) -> dict[str, Any] | None:
        """A query clause selecting only the documents this user may see (None: all)."""
        if (owned := self.owned_clause(catalog)) is not None:
            return owned
        survey = self.restricting_survey(catalog)
        if survey is None or self.is_aux(catalog):
            return None
        return {"candidate.programid": {"$in": self.programids(survey.name)}}

    def history_stage(self, catalog: str) -> Stage | None:
        """An $addFields stage keeping only the permitted points of the history arrays."""
        survey = self.restricting_survey(catalog)
        if survey is None or not self.is_aux(catalog):
            return None
        allowed = self.programids(survey.name)

        def keep(array: str) -> dict[str, Any]:
            return {
                "$cond": [
                    {"$isArray": f"${array}"},
                    {
                        "$filter": {
                            "input": f"${array}",
                            "cond": {"$in": ["$$this.programid", allowed]},
                        }
                    },
                    f"${array}",
                ]
            }

        return {"$addFields": {array: keep(array) for array in HISTORY_ARRAYS}}

    def restriction(self, catalog: str) -> list[Stage]:
        """Stages that come before anything the user asked for."""
        stages: list[Stage] = []
        if (clause := self.document_clause(catalog)) is not None:
            stages.append({"$match": clause})
        if (history := self.history_stage(catalog)) is not None:
            stages.append(history)
        return stages

    def needs_pipeline(self, catalog: str) -> bool:
        """Whether a plain `find` cannot express the restriction (documents are rewritten)."""
        return self.history_stage(catalog) is not None

    def find_filter(self, catalog: str, flt: dict[str, Any]) -> dict[str, Any]:
        """A `find` filter seeing only permitted documents (for catalogs where that suffices)."""
        clause = self.document_clause(catalog)
        if clause is None:
            return flt
        return {"$and": [clause, flt]} if flt else clause

    def pipeline(self, catalog: str, flt: dict[str, Any] | None = None) -> list[Stage]:
        """The restriction, then the user's filter."""
        return [*self.restriction(catalog), *([{"$match": flt}] if flt else [])]


RIGHTS_KEY: web.RequestKey[DataRights] = web.RequestKey("rights")


def data_rights(request: web.Request) -> DataRights:
    """The request's data rights (401 when nobody is logged in)."""
    rights = request.get(RIGHTS_KEY)
    if rights is None:
        rights = DataRights(current_user(request), request.app[CONFIG])
        request[RIGHTS_KEY] = rights
    return rights
