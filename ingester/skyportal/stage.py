"""Stage: the broker feed to SkyPortal/Fritz (`misc.broker: true`), fed by the pipeline's hand-off.

Per batch the stage *decides* what to post (upstream `alert_sentinel_skyportal`, §4.7) and writes
it to the outbox (`skyportal_outbox`, one bulk write) before the batch counts as done, so Kafka
offsets are committed once the outbox holds the posts; `ingester.skyportal.delivery` sends them.

Per alert of an object new to the feed that passed >= 1 filter: the candidate (filter ids, score,
passing alert id), annotations (filters with non-empty `annotations` output), the full light
curve per stream (aux prv_candidates + stored forced photometry + other stored alerts), three
thumbnails, the autosave (with `ignore_if_in_group_ids` / `saver_per_group_id` read from the
filter's `autosave`) with its comments, auto follow-up requests. Per alert of an object already
fed: the candidate and annotations (updated only with `update_annotations`) when filters passed,
autosave to groups not holding it, follow-ups, and always the photometry points newer than what
was already sent to that stream (per-object `last_jd` per stream and origin: never the whole
light curve again). What depends on SkyPortal's current state (the groups holding a source,
existing annotations and follow-up requests) is looked up at delivery.

Set-up (`resolve_setup`, run and retried by the delivery thread): instrument id and stream ids per
survey, group and filter names. Posts name their stream by label, so deciding never waits for
SkyPortal: a survey SkyPortal cannot take yet (no instrument or stream, SkyPortal down or
refusing) keeps its entries pending in the outbox while set-up is retried with backoff, and the
other surveys, archiving, filters and the results stream go on. Only a missing token stops the
ingester (one line).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.database import AsyncDatabase

from ingester.archive import insert_ignoring_duplicates
from ingester.mongify import history_key
from ingester.skyportal.client import Deferred, Rejected, SkyPortalClient
from ingester.skyportal.outbox import (
    PENDING,
    insert_entries,
    objects_name,
)
from ingester.skyportal.photometry import (
    alert_points,
    forced_points,
    photometry_body,
    split_by_stream,
)
from kowalski.config import Config
from kowalski.documents import Doc, utcnow
from kowalski.surveys import SURVEYS, Survey

log = logging.getLogger("kowalski.skyportal")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"
THUMBNAILS = (("new", "science"), ("ref", "template"), ("sub", "difference"))


class FeedSetupError(Exception):
    """SkyPortal cannot be fed at all: the message is the one line the ingester stops with."""


@dataclass(frozen=True)
class SurveySetup:
    instrument_id: int
    streams: dict[str, int]  # stream label (SkyPortalSpec.stream_ids) -> SkyPortal stream id


@dataclass(frozen=True)
class FeedSetup:
    """What set-up learned from SkyPortal: the surveys that can be delivered, and why the others
    wait (`waiting`: survey -> reason)."""

    surveys: dict[str, SurveySetup]
    group_names: dict[int, str] = field(default_factory=dict)
    filter_names: dict[int, str] = field(default_factory=dict)
    waiting: dict[str, str] = field(default_factory=dict)


def fed_surveys(surveys: Sequence[str]) -> list[str]:
    """The surveys of `surveys` the registry says how to post (all of them today)."""
    return [s for s in surveys if SURVEYS[s].skyportal is not None]


# ---------------------------------------------------------------------------------- start-up


async def resolve_setup(
    cfg: Config, surveys: Sequence[str], filters: Sequence[tuple[int, int]] = ()
) -> FeedSetup:
    """Instrument and streams per survey, names per (group_id, filter_id). A survey SkyPortal
    cannot take (no instrument, no matching stream) or a SkyPortal that cannot be reached or
    refuses the token waits (`FeedSetup.waiting`, with the reason); only a missing token is a
    FeedSetupError (nothing could ever be delivered)."""
    if not cfg.skyportal.token:
        raise FeedSetupError("misc.broker is true but skyportal.token is not set (SKYPORTAL_TOKEN)")
    async with SkyPortalClient(cfg) as sp:
        return await resolve_with(sp, surveys, filters)


async def resolve_with(
    sp: SkyPortalClient, surveys: Sequence[str], filters: Sequence[tuple[int, int]] = ()
) -> FeedSetup:
    """`resolve_setup` on an open client; a SkyPortal that cannot be reached or refuses makes
    every survey wait with that reason."""
    try:
        return await _resolve(sp, fed_surveys(surveys), filters)
    except Rejected as exc:
        reason = f"SkyPortal at {sp.url} refused the feed's set-up: {exc}"
    except Deferred as exc:
        reason = (
            f"SkyPortal at {sp.url} rejected skyportal.token (HTTP 401)"
            if "HTTP 401" in str(exc)
            else f"SkyPortal at {sp.url} is not reachable: {exc}"
        )
    log.warning("SkyPortal feed: %s wait: %s", ", ".join(fed_surveys(surveys)), reason)
    return FeedSetup({}, waiting=dict.fromkeys(fed_surveys(surveys), reason))


async def _resolve(
    sp: SkyPortalClient, surveys: Sequence[str], filters: Sequence[tuple[int, int]]
) -> FeedSetup:
    streams = (await sp.request("GET", "/api/streams", retry=False)).data or []
    setups: dict[str, SurveySetup] = {}
    waiting: dict[str, str] = {}
    for name in surveys:
        spec = SURVEYS[name].skyportal
        assert spec is not None
        found = (
            await sp.request(
                "GET", "/api/instrument", params={"name": spec.instrument}, retry=False
            )
        ).data or []
        ids = spec.stream_ids(streams)
        missing = [label for label in spec.stream_labels() if label not in ids]
        if not found:
            waiting[name] = f"SkyPortal at {sp.url} has no instrument named {spec.instrument!r}"
        elif missing:
            waiting[name] = (
                f"SkyPortal at {sp.url} has no stream for {name} (wanted: {spec.stream_rule()}; "
                f"found {sorted(str(s.get('name')) for s in streams)})"
            )
        else:
            setups[name] = SurveySetup(int(found[0]["id"]), ids)
    for name, reason in waiting.items():
        log.warning("SkyPortal feed: %s waits: %s", name, reason)
    group_names: dict[int, str] = {}
    filter_names: dict[int, str] = {}
    for group_id, filter_id in filters:
        group = await group_info(sp, group_id)
        if group is None:
            log.warning("SkyPortal has no group %s (filter %s)", group_id, filter_id)
            continue
        group_names[group_id], names = group
        if filter_id in names:
            filter_names[filter_id] = names[filter_id]
    return FeedSetup(setups, group_names, filter_names, waiting)


async def group_info(sp: SkyPortalClient, group_id: int) -> tuple[str, dict[int, str]] | None:
    """(group name: nickname or name, {filter id: filter name}), or None if there is no group."""
    try:
        answer = await sp.request(
            "GET", f"/api/groups/{group_id}", params={"includeGroupUsers": "False"}, retry=False
        )
    except Rejected as exc:
        if exc.status in (400, 404):
            return None
        raise
    data = answer.data or {}
    name = str(data.get("nickname") or data.get("name") or group_id)
    return name, {int(f["id"]): str(f.get("name")) for f in data.get("filters", []) if "id" in f}


def check_token_or_exit(cfg: Config) -> None:
    """For `python -m ingester`: a broker without a token is a configuration error (one line)."""
    if not cfg.skyportal.token:
        print(
            "error: misc.broker is true but skyportal.token is not set (SKYPORTAL_TOKEN)",
            file=sys.stderr,
        )
        raise SystemExit(1)


# ------------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class FeedFactory:
    """Picklable: builds each worker thread's stage around its own database client. The stage
    decides posts from the registry alone (streams by label), so it runs for every survey even
    while SkyPortal is unreachable; delivery fills in SkyPortal's ids once set up."""

    cfg: Config

    def __call__(self, db: AsyncDatabase[Doc]) -> FeedStage:
        return FeedStage(self.cfg, db)


@dataclass
class ObjectState:
    """What the feed already decided for one object (`skyportal_objects`)."""

    first_candid: int  # the alert whose filter pass made the object a candidate
    last_jd: dict[str, float]
    seq: int


class FeedStage:
    """The hand-off callable: `await stage(survey, alerts, passed)` per batch."""

    def __init__(self, cfg: Config, db: AsyncDatabase[Doc]) -> None:
        self.cfg = cfg
        self.db = db

    async def __call__(
        self, survey: Survey, alerts: list[Doc], passed: dict[int, list[Doc]]
    ) -> None:
        if not self.cfg.misc.broker or survey.skyportal is None:
            return
        by_object: dict[str, list[Doc]] = defaultdict(list)
        for alert in sorted(alerts, key=lambda a: (a["candidate"]["jd"], a["candid"])):
            by_object[str(alert[survey.object_key])].append(alert)
        states = await self._states(survey, list(by_object))
        fresh = {
            obj: next(a["candid"] for a in items if passed.get(a["candid"]))
            for obj, items in by_object.items()
            if obj not in states and any(passed.get(a["candid"]) for a in items)
        }
        if fresh:
            states.update(await self._claim(survey, fresh))
        wanted = [obj for obj in by_object if obj in states]
        if not wanted:
            return
        new_objects = [
            obj
            for obj in wanted
            if states[obj].first_candid in {a["candid"] for a in by_object[obj]}
        ]
        ids = {str(a[survey.object_key]): a[survey.object_key] for a in alerts}
        history = await self._history(survey, {o: ids[o] for o in wanted}, new_objects)
        now = utcnow()
        entries: list[Doc] = []
        updates = []
        for obj in wanted:
            state = states[obj]
            before = dict(state.last_jd)
            decided = self._decide_object(
                survey, obj, by_object[obj], passed, history[obj], state, now
            )
            if not decided:
                continue
            entries.extend(decided)
            changed = {k: v for k, v in state.last_jd.items() if before.get(k) != v}
            updates.append(
                UpdateOne(
                    {"_id": f"{survey.name}:{obj}"},
                    {
                        "$max": {
                            "seq": state.seq,
                            **{f"last_jd.{k}": v for k, v in changed.items()},
                        },
                    },
                )
            )
        # the posts first, then what they claim was sent: a crash in between re-decides the
        # same entries (same ids, kept once), never loses one
        await insert_entries(self.db, self.cfg, entries)
        if updates:
            await self.db[objects_name(self.cfg)].bulk_write(updates, ordered=False)

    async def _states(self, survey: Survey, objects: list[str]) -> dict[str, ObjectState]:
        ids = [f"{survey.name}:{o}" for o in objects]
        docs = await self.db[objects_name(self.cfg)].find({"_id": {"$in": ids}}).to_list()
        return {
            str(d["obj_id"]): ObjectState(
                int(d["first_candid"]), dict(d.get("last_jd", {})), int(d.get("seq", 0))
            )
            for d in docs
        }

    async def _claim(self, survey: Survey, fresh: dict[str, int]) -> dict[str, ObjectState]:
        """Make objects candidates, each by its first passing alert; where another worker (or
        an earlier run of this batch) got there first, its claim stands."""
        now = utcnow()
        docs = [
            {
                "_id": f"{survey.name}:{obj}",
                "survey": survey.name,
                "obj_id": obj,
                "first_candid": candid,
                "last_jd": {},
                "seq": 0,
                "created_at": now,
            }
            for obj, candid in fresh.items()
        ]
        await insert_ignoring_duplicates(self.db[objects_name(self.cfg)], docs)
        return await self._states(survey, list(fresh))

    async def _history(
        self, survey: Survey, objects: dict[str, Any], new_objects: list[str]
    ) -> dict[str, list[Doc]]:
        """Photometry points per object (`objects`: feed id -> the id as stored, an integer for
        Rubin): aux history, stored forced photometry and, for objects new to the feed, the
        candidates of every stored alert not already in the history."""
        spec = survey.skyportal
        assert spec is not None
        aux = {
            str(d["_id"]): d
            for d in await self.db[survey.aux_collection(self.cfg)]
            .find({"_id": {"$in": list(objects.values())}}, {"prv_candidates": 1, "fp_hists": 1})
            .to_list()
        }
        stored: dict[str, list[Doc]] = defaultdict(list)
        if new_objects:
            docs = (
                await self.db[survey.alerts_collection(self.cfg)]
                .find(
                    {survey.object_key: {"$in": [objects[o] for o in new_objects]}},
                    {survey.object_key: 1, "candidate": 1},
                )
                .to_list()
            )
            for doc in docs:
                stored[str(doc[survey.object_key])].append(doc["candidate"])
        out = {}
        for obj in objects:
            prv = list(aux.get(obj, {}).get("prv_candidates", []))
            have = {history_key(p, survey.history_key) for p in prv}
            prv.extend(
                c for c in stored.get(obj, []) if history_key(c, survey.history_key) not in have
            )
            out[obj] = [
                *alert_points(spec, prv),
                *forced_points(spec, aux.get(obj, {}).get("fp_hists", [])),
            ]
        return out

    def _decide_object(
        self,
        survey: Survey,
        obj: str,
        alerts: list[Doc],
        passed: dict[int, list[Doc]],
        points: list[Doc],
        state: ObjectState,
        now: dt.datetime,
    ) -> list[Doc]:
        assert survey.skyportal is not None
        streams = split_by_stream(points, survey.skyportal)
        out: list[Doc] = []
        candids = [a["candid"] for a in alerts]
        # alerts before the one that made the object a candidate wait for it; that one is "new"
        start = candids.index(state.first_candid) if state.first_candid in candids else -1
        for index, alert in enumerate(alerts):
            if index < start:
                continue
            new = index == start
            filters = passed.get(alert["candid"], [])
            posts: list[tuple[str, str, Doc, Doc]] = []  # kind, key, body, extra fields
            if filters:
                posts.append(("candidate", "-", candidate_body(alert, obj, filters, now), {}))
                posts.extend(annotation_posts(obj, filters, new=new))
            for key, items in streams.items():
                fresh = [p for p in items if p["jd"] > state.last_jd.get(key, float("-inf"))]
                if fresh:
                    body = photometry_body(obj, fresh)
                    posts.append(("photometry", key, body, {"first_jd": fresh[0]["jd"]}))
                    state.last_jd[key] = fresh[-1]["jd"]
            if filters and new:
                posts.extend(
                    ("thumbnail", ttype, body, {}) for ttype, body in thumbnails(survey, alert, obj)
                )
            posts.extend(autosave_posts(obj, filters, new=new))
            posts.extend(followup_posts(obj, filters, now))
            for kind, key, body, extra in posts:
                state.seq += 1
                out.append(
                    {
                        "_id": f"{survey.name}:{alert['candid']}:{kind}:{key}",
                        "survey": survey.name,
                        "obj_id": obj,
                        "candid": alert["candid"],
                        "seq": state.seq,
                        "kind": kind,
                        "key": key,
                        "body": body,
                        **extra,
                        "state": PENDING,
                        "attempts": 0,
                        "last_error": None,
                        "created_at": now,
                        "next_attempt_at": now,
                        "lease_until": None,
                    }
                )
        return out


# ------------------------------------------------------------------------------ the posts


def candidate_body(alert: Doc, obj: str, filters: list[Doc], now: dt.datetime) -> Doc:
    candidate = alert["candidate"]
    score = candidate.get("drb")
    return {
        "id": obj,
        "ra": candidate.get("ra"),
        "dec": candidate.get("dec"),
        "score": score if score is not None else candidate.get("rb"),
        "filter_ids": [f["filter_id"] for f in filters],
        "passing_alert_id": alert["candid"],
        "passed_at": now.strftime(TIME_FORMAT),
        "origin": "Kowalski",
    }


def annotation_posts(obj: str, filters: list[Doc], new: bool) -> list[tuple[str, str, Doc, Doc]]:
    """One per filter with annotations; the origin "<group name>:<filter name>" is filled in at
    delivery. `new`: POST; else look up the object's annotations and POST if the origin has none,
    PUT only if the filter has update_annotations."""
    posts = []
    for f in filters:
        data = (f.get("data") or {}).get("annotations") or {}
        if not isinstance(data, dict) or not data:
            continue
        body = {"obj_id": obj, "data": json_safe(data), "group_ids": [f["group_id"]]}
        extra = {
            "group_id": f["group_id"],
            "filter_id": f["filter_id"],
            "mode": "post" if new else "upsert",
            "update": bool(f.get("update_annotations", False)),
        }
        posts.append(("annotation", str(f["filter_id"]), body, extra))
    return posts


def json_safe(value: Any) -> Any:
    """A filter's output as JSON (ObjectId, dates, ... in MongoDB extended JSON)."""
    from bson import json_util

    return json.loads(json_util.dumps(value))


def autosave_posts(obj: str, filters: list[Doc], new: bool) -> list[tuple[str, str, Doc, Doc]]:
    """One save to every autosaving filter's group (comments follow, for groups saved to).
    Known objects are saved only to groups that do not hold them yet (checked at delivery)."""
    groups = []
    for f in filters:
        option = f.get("autosave", False)
        if option is False or option is None:
            continue
        settings = option if isinstance(option, dict) else {}
        groups.append(
            {
                "group_id": f["group_id"],
                "ignore_group_ids": list(settings.get("ignore_group_ids") or []),
                "saver_id": settings.get("saver_id"),
                "comment": settings.get("comment"),
            }
        )
    if not groups:
        return []
    extra = {"groups": groups, "mode": "new" if new else "known"}
    return [("autosave", "-", autosave_body(obj, groups), extra)]


def autosave_body(obj: str, groups: list[Doc]) -> Doc:
    """`POST /api/sources` body (group ids are JSON object keys: strings)."""
    body: Doc = {"id": obj, "group_ids": [g["group_id"] for g in groups], "origin": "Kowalski"}
    ignore = {str(g["group_id"]): g["ignore_group_ids"] for g in groups if g["ignore_group_ids"]}
    savers = {str(g["group_id"]): g["saver_id"] for g in groups if g.get("saver_id") is not None}
    if ignore:
        body["ignore_if_in_group_ids"] = ignore
    if savers:
        body["saver_per_group_id"] = savers
    return body


def priority_alias(payload: Doc) -> str:
    return next((k for k in ("urgency", "Urgency") if k in payload), "priority")


def followup_request(f: Doc, obj: str, now: dt.datetime) -> Doc | None:
    """The follow-up request of a filter's auto_followup (§4.6), or None."""
    option = f.get("auto_followup") or {}
    if not option or "allocation_id" not in option:
        return None
    output = option.get("data") or {}
    payload = dict(option.get("payload") or {})
    alias = priority_alias(payload)
    order = option.get("priority_order", "asc")
    payload[alias] = payload.get(alias, 0 if order == "asc" else 5)
    for key, value in (output.get("payload") or {}).items():
        if key in payload:
            payload[key] = value
    if alias.lower() != "urgency":
        payload["start_date"] = now.strftime(TIME_FORMAT)
        end = now + dt.timedelta(days=float(option.get("validity_days", 7)))
        payload["end_date"] = end.strftime(TIME_FORMAT)
    comment = output.get("comment") if isinstance(output.get("comment"), str) else None
    comment = comment or option.get("comment")
    if comment is not None:
        comment = f"{str(comment).strip()} ({alias}: {payload[alias]})"
    data: Doc = {
        "obj_id": obj,
        "allocation_id": option["allocation_id"],
        "target_group_ids": sorted({f["group_id"], *option.get("target_group_ids", [])}),
        "payload": payload,
        "source_group_ids": [f["group_id"]],
        "not_if_classified": True,
        "not_if_spectra_exist": True,
        "not_if_tns_classified": True,
        "not_if_duplicates": True,
        "radius": option.get("radius", 0.5),
    }
    if option.get("ignore_allocation_ids"):
        data["ignore_allocation_ids"] = list(option["ignore_allocation_ids"])
    if "not_if_tns_reported" in option:
        data["not_if_tns_reported"] = option["not_if_tns_reported"]
    autosave = f.get("autosave")
    if isinstance(autosave, dict):
        data["ignore_source_group_ids"] = list(autosave.get("ignore_group_ids") or [])
    return {
        "allocation_id": option["allocation_id"],
        "comment": comment,
        "priority_order": order,
        "priority_alias": alias,
        "implements_update": bool(option.get("implements_update", True)),
        "group_id": f["group_id"],
        "data": data,
    }


def followup_posts(
    obj: str, filters: list[Doc], now: dt.datetime
) -> list[tuple[str, str, Doc, Doc]]:
    """Requests in upstream's order: desc-priority filters first, each by priority, highest first."""
    requests = [r for r in (followup_request(f, obj, now) for f in filters) if r is not None]

    def by_priority(r: Doc) -> Any:
        return r["data"]["payload"][r["priority_alias"]]

    desc = sorted(
        (r for r in requests if r["priority_order"] == "desc"), key=by_priority, reverse=True
    )
    asc = sorted(
        (r for r in requests if r["priority_order"] != "desc"), key=by_priority, reverse=True
    )
    return [
        ("followup", f"{r['group_id']}-{r['allocation_id']}", r["data"], {"followup": r})
        for r in [*desc, *asc]
    ]


def thumbnails(survey: Survey, alert: Doc, obj: str) -> list[tuple[str, Doc]]:
    """(ttype, `POST /api/thumbnail` body) for the science/template/difference cutouts, as PNG
    (bone colormap, 1-100 percentile limits, log stretch, linear for the difference)."""
    from kowalski.cutouts import read_image, render_png, stamp_bytes

    out = []
    for ttype, cutout in THUMBNAILS:
        raw = alert.get(survey.cutout_field(cutout))
        if not raw:
            continue
        try:
            image, _ = read_image(stamp_bytes(raw)[0], survey, False)
            stretch = "linear" if cutout == "difference" else "log"
            png = render_png(image, "asymmetric_percentile", stretch, "bone")
        except (OSError, ValueError) as exc:
            log.warning("%s: no %s thumbnail: %s", obj, cutout, exc)
            continue
        out.append((ttype, {"obj_id": obj, "data": base64.b64encode(png).decode(), "ttype": ttype}))
    return out


# ------------------------------------------------------------------------------ status CLI


def main(argv: list[str] | None = None) -> int:
    """`python -m ingester.skyportal status`: pending/failed outbox entries per kind."""
    import argparse

    from ingester.skyportal.outbox import format_status, status
    from kowalski.config import load_config_or_exit
    from kowalski.db import async_client

    parser = argparse.ArgumentParser(prog="python -m ingester.skyportal")
    parser.add_argument("command", choices=["status"])
    parser.parse_args(argv)
    cfg = load_config_or_exit()

    async def run() -> str:
        client = async_client(cfg)
        try:
            return format_status(await status(client[cfg.database.db], cfg))
        finally:
            await client.close()

    from pymongo.errors import PyMongoError

    try:
        print(asyncio.run(run()))
    except PyMongoError as exc:
        print(f"error: database: {str(exc).splitlines()[0][:300]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
