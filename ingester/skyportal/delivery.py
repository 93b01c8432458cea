"""Delivery of the outbox to SkyPortal: an asyncio task in the ingester process.

- Entries are delivered in order per object (`seq`); objects in parallel, at most
  `skyportal.max_connections` requests in flight.
- An entry is claimed with a lease before it is sent, so several ingesters never send the same
  entry at once; a process that dies leaves the lease to expire.
- SkyPortal down, slow, 405/429/5xx (after the client's retries): the entry stays pending with its
  attempts and last error, the object waits (backoff up to `skyportal.max_backoff_s`) and later
  entries of that object wait behind it. Pending entries survive restarts: they are in the DB.
- SkyPortal refuses (other 4xx, status != success): the entry is marked failed with the error
  (see `kowalski.py feed status`) and the object's next entries go on, as upstream logs and goes on.
- A POST whose answer was lost (timeout, dropped connection) is not repeated by the client: the
  entry is deferred and its next attempt looks before writing (sources and their groups for an
  autosave, annotations by origin, follow-up requests), so a slow SkyPortal gets no duplicates.
- Follow-up requests are never sent blindly: every attempt first looks up the source's requests
  and creates one only if none matches, without client-side retries; a request that timed out is
  found by the next attempt instead of being created twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase

from ingester.skyportal.client import Answer, Deferred, Rejected, SkyPortalClient
from ingester.skyportal.outbox import (
    DONE,
    FAILED,
    PENDING,
    ensure_indexes,
    objects_name,
    outbox_name,
    save_setup_states,
)
from ingester.skyportal.photometry import photometry_params, stream_label, with_ids
from ingester.skyportal.stage import FeedSetup, autosave_body, fed_surveys, group_info, resolve_with
from kowalski import metrics
from kowalski.config import Config
from kowalski.documents import Doc, utcnow
from kowalski.retry import backoff

log = logging.getLogger("kowalski.skyportal")
STOP_GRACE_SECONDS = 30.0  # on stop, deliveries in flight get this long to finish
CALLS_PER_ENTRY = 4  # the most calls one entry makes before its next progress record
FOLLOWUP_STATUSES = ("complete", "submitted", "deleted", "failed")
FAILED_REQUEST_MEMORY = dt.timedelta(hours=12)
IGNORED_PAYLOAD_KEYS = frozenset(
    {"priority", "urgency", "Urgency", "start_date", "end_date", "advanced", "observation_choices"}
)


@dataclass
class DeliveryReport:
    delivered: int = 0
    failed: int = 0
    deferred: int = 0


@dataclass
class Delivery:
    """Delivers pending outbox entries until `stop()`."""

    cfg: Config
    db: AsyncDatabase[Doc]
    sp: SkyPortalClient
    setup: FeedSetup
    report: DeliveryReport = field(default_factory=DeliveryReport)

    def __post_init__(self) -> None:
        self.outbox = self.db[outbox_name(self.cfg)]
        self.setup_attempts = 0  # set-up rounds with some survey still waiting
        self.next_setup = 0.0  # loop time of the next set-up attempt for waiting surveys
        self.groups: dict[int, tuple[str, dict[int, str]]] = {}
        self.active: set[str] = set()
        self.slots = asyncio.Semaphore(self.cfg.skyportal.max_connections)
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.handlers: dict[str, Callable[[Doc], Awaitable[Doc | None]]] = {
            "candidate": self._plain("POST", "/api/candidates"),
            "photometry": self._photometry,
            "thumbnail": self._plain("POST", "/api/thumbnail"),
            "annotation": self._annotation,
            "autosave": self._autosave,
            "followup": self._followup,
        }

    def stop(self) -> None:
        self._stop.set()

    async def set_up(self) -> None:
        """Resolve the surveys still waiting (all of them at start), at most once per backoff
        (doubling up to skyportal.max_backoff_s while some keep waiting); record the states."""
        loop = asyncio.get_running_loop()
        if not self.setup.waiting or loop.time() < self.next_setup:
            return
        found = await resolve_with(self.sp, list(self.setup.waiting))
        self.setup = FeedSetup(
            {**self.setup.surveys, **found.surveys},
            {**self.setup.group_names, **found.group_names},
            {**self.setup.filter_names, **found.filter_names},
            found.waiting,
        )
        for name in found.surveys:
            log.info("SkyPortal feed: %s set up; its waiting entries are delivered now", name)
        self.setup_attempts += 1
        sp = self.cfg.skyportal
        delay = backoff(self.setup_attempts, sp.backoff_s, sp.max_backoff_s)
        self.next_setup = loop.time() + delay
        await save_setup_states(
            self.db, self.cfg, self.setup, utcnow() + dt.timedelta(seconds=delay)
        )

    async def run(self) -> DeliveryReport:
        await ensure_indexes(self.db, self.cfg)
        while not self._stop.is_set():
            await self.set_up()
            started = await self.round()
            if not started:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.cfg.skyportal.poll_s)
        if self._tasks:  # let deliveries in flight finish (each is bounded by timeouts)
            await asyncio.wait(list(self._tasks), timeout=STOP_GRACE_SECONDS)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return self.report

    def lease_seconds(self) -> float:
        """Longer than one entry's delivery can take: a lease older than that was left by a
        process that died, and the entry is taken over."""
        sp = self.cfg.skyportal
        per_call = (sp.retries + 1) * max(
            sp.timeout_s, sp.photometry_timeout_s, sp.followup_timeout_s
        )
        backoffs: float = sum(sp.backoff_s * 2**i for i in range(sp.retries))
        return CALLS_PER_ENTRY * (per_call + backoffs) + 30.0

    async def round(self) -> int:
        """Start a delivery task for every object whose head entry is due; how many started."""
        now = utcnow()
        heads: dict[str, Doc] = {}
        if not self.setup.surveys:
            return 0
        cursor = self.outbox.find(
            {
                "state": PENDING,
                "next_attempt_at": {"$lte": now},
                "survey": {"$in": sorted(self.setup.surveys)},
            },
            {"obj_id": 1, "seq": 1, "next_attempt_at": 1, "lease_until": 1},
            sort=[("obj_id", ASCENDING), ("seq", ASCENDING), ("_id", ASCENDING)],
            limit=20000,
        )
        for doc in await cursor.to_list():
            heads.setdefault(doc["obj_id"], doc)
        started = 0
        for obj, head in heads.items():
            if obj in self.active or _later(head.get("next_attempt_at"), now):
                continue
            if _later(head.get("lease_until"), now):
                continue
            self.active.add(obj)
            task = asyncio.create_task(self._deliver_object(obj))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started += 1
        return started

    async def drain(self, timeout: float) -> bool:
        """Deliver until nothing pending is due (tests, `feed flush`); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            await self.set_up()
            started = await self.round()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=max(0.0, deadline - loop.time()))
            elif not started:
                return True
        return False

    async def _deliver_object(self, obj: str) -> None:
        try:
            while not self._stop.is_set():
                entry = await self._claim_head(obj)
                if entry is None or not await self._deliver(entry):
                    return
        finally:
            self.active.discard(obj)

    async def _claim_head(self, obj: str) -> Doc | None:
        now = utcnow()
        head = await self.outbox.find_one(
            {"obj_id": obj, "state": PENDING}, sort=[("seq", ASCENDING), ("_id", ASCENDING)]
        )
        if head is None or _later(head.get("next_attempt_at"), now):
            return None
        if _later(head.get("lease_until"), now):
            return None
        lease = now + dt.timedelta(seconds=self.lease_seconds())
        # the attempt counts as started before anything is sent: a crash after a write leaves
        # `started` above the attempts finished, and the next attempt looks before writing
        claimed = await self.outbox.update_one(
            {"_id": head["_id"], "state": PENDING, "lease_until": head.get("lease_until")},
            {"$set": {"lease_until": lease}, "$inc": {"started": 1}},
        )
        return head if claimed.modified_count == 1 else None

    async def _deliver(self, entry: Doc) -> bool:
        """One entry; True if the object's next entry may follow."""
        handler = self.handlers.get(entry["kind"])
        attempts = int(entry.get("attempts", 0)) + 1
        try:
            if handler is None:
                raise Rejected(0, f"unknown outbox kind {entry['kind']!r}")
            async with self.slots:
                result = await handler(entry)
        except Rejected as exc:
            await self._finish(
                entry, {"state": FAILED, "attempts": attempts, "last_error": str(exc)}
            )
            if entry["kind"] == "photometry":
                await self._unsend(entry)
            self.report.failed += 1
            metrics.SKYPORTAL_DELIVERIES.labels("refused").inc()
            log.error("SkyPortal refused %s: %s", entry["_id"], exc)
            return True
        except Exception as exc:  # Deferred, or anything unexpected: kept, retried, visible
            if not isinstance(exc, Deferred):
                log.exception("SkyPortal: delivering %s failed", entry["_id"])
            sp = self.cfg.skyportal
            delay = backoff(attempts + 1, sp.backoff_s, sp.max_backoff_s)
            await self._finish(
                entry,
                {
                    "attempts": attempts,
                    "last_error": str(exc),
                    "next_attempt_at": utcnow() + dt.timedelta(seconds=delay),
                },
            )
            # the object's later entries wait behind this one (and out of the due scan)
            await self.outbox.update_many(
                {"obj_id": entry["obj_id"], "state": PENDING},
                {"$max": {"next_attempt_at": utcnow() + dt.timedelta(seconds=delay)}},
            )
            self.report.deferred += 1
            metrics.SKYPORTAL_DELIVERIES.labels("retried").inc()
            log.warning("SkyPortal: %s deferred (attempt %d): %s", entry["_id"], attempts, exc)
            return False
        except asyncio.CancelledError:  # shutting down: release the lease at once
            await self._finish(entry, {})
            raise
        done_at = utcnow()
        if isinstance(entry.get("created_at"), dt.datetime):  # observed before it shows done
            waited = (done_at - entry["created_at"]).total_seconds()
            labels = (str(entry.get("survey", "")), str(entry["kind"]))
            metrics.SKYPORTAL_POST_LATENCY.labels(*labels).observe(max(0.0, waited))
        await self._finish(
            entry, {"state": DONE, "attempts": attempts, "done_at": done_at, "result": result}
        )
        self.report.delivered += 1
        metrics.SKYPORTAL_DELIVERIES.labels("delivered").inc()
        return True

    async def _finish(self, entry: Doc, changes: Doc) -> None:
        await self.outbox.update_one(
            {"_id": entry["_id"]}, {"$set": {**changes, "lease_until": None}}
        )

    async def _unsend(self, entry: Doc) -> None:
        """Refused photometry was not sent: the object's sent-up-to mark for that stream goes
        back before its first point, so the object's next alert posts those points again."""
        if "first_jd" not in entry:
            return
        before = float(entry["first_jd"]) - 1e-6
        await self.db[objects_name(self.cfg)].update_one(
            {"_id": f"{entry['survey']}:{entry['obj_id']}"},
            {"$min": {f"last_jd.{entry['key']}": before}},
        )

    async def _done_before(self, entry: Doc) -> bool:
        """Whether another entry of this kind for this object was delivered already. Two batches
        with alerts of one new object, handed off at the same time, queue one entry as for a new
        object and one as for a known object, in either order: the later one must look first."""
        query = {
            "obj_id": entry["obj_id"],
            "kind": entry["kind"],
            "state": DONE,
            "_id": {"$ne": entry["_id"]},
        }
        return await self.outbox.find_one(query, {"_id": 1}) is not None

    async def _progress(self, entry: Doc, step: str, value: Any) -> None:
        """Record a finished step of a multi-call entry, so a retry does not repeat it."""
        entry.setdefault("progress", {})[step] = value
        await self.outbox.update_one({"_id": entry["_id"]}, {"$set": {f"progress.{step}": value}})

    # -------------------------------------------------------------------------- handlers

    def _plain(self, method: str, path: str) -> Callable[[Doc], Awaitable[Doc | None]]:
        async def send(entry: Doc) -> Doc | None:
            await self.sp.request(method, path, entry["body"])
            return None

        return send

    async def _photometry(self, entry: Doc) -> Doc | None:
        setup = self.setup.surveys[entry["survey"]]
        stream_id = setup.streams.get(stream_label(entry["key"]))
        if stream_id is None:
            raise Rejected(0, f"no SkyPortal stream for {entry['key']!r}")
        await self.sp.request(
            "PUT",
            "/api/photometry",
            with_ids(entry["body"], setup.instrument_id, stream_id),
            params=photometry_params(entry["key"]) or None,
            timeout=self.cfg.skyportal.photometry_timeout_s,
        )
        return None

    async def _origin(self, entry: Doc) -> str:
        """ "<group name>:<filter name>", from start-up or looked up once per group."""
        group_id, filter_id = int(entry["group_id"]), int(entry["filter_id"])
        group_name = self.setup.group_names.get(group_id)
        filter_name = self.setup.filter_names.get(filter_id)
        if group_name is None or filter_name is None:
            if group_id not in self.groups:
                self.groups[group_id] = await group_info(self.sp, group_id) or (str(group_id), {})
            name, filters = self.groups[group_id]
            group_name = group_name or name
            filter_name = filter_name or filters.get(filter_id, str(filter_id))
        return f"{group_name}:{filter_name}"

    async def _annotation(self, entry: Doc) -> Doc | None:
        obj = entry["obj_id"]
        body = {**entry["body"], "origin": await self._origin(entry)}
        path = f"/api/sources/{obj}/annotations"
        if (
            entry.get("mode") == "post"
            and not _retried(entry)
            and not await self._done_before(entry)
        ):
            await self.sp.request("POST", path, body)
            return {"action": "posted"}
        # a known object, or a retry (the first POST may have landed): look before writing
        existing = {a.get("origin"): a for a in (await self.sp.request("GET", path)).data or []}
        current = existing.get(body["origin"])
        if current is None:
            await self.sp.request("POST", path, body)
            return {"action": "posted"}
        if not entry.get("update") or entry.get("mode") == "post":
            return {"action": "kept"}
        await self.sp.request(
            "PUT", f"{path}/{current['id']}", {**body, "author_id": current.get("author_id")}
        )
        return {"action": "updated"}

    async def _autosave(self, entry: Doc) -> Doc | None:
        obj = entry["obj_id"]
        groups: list[Doc] = entry["groups"]
        progress = entry.get("progress", {})
        if "saved" not in progress:
            # a known object, a retry (an earlier attempt's POST may have landed), or an object
            # saved by another entry already: look first
            holding: set[Any] = set()
            if entry.get("mode") == "known" or _retried(entry) or await self._done_before(entry):
                is_source = await self.sp.request("HEAD", f"/api/sources/{obj}")
                if is_source.status == 200:
                    held = (await self.sp.request("GET", f"/api/sources/{obj}/groups")).data or []
                    holding = {g.get("id") for g in held}
                    groups = [g for g in groups if g["group_id"] not in holding]
            saved: list[int] = []
            if groups:
                answer = await self.sp.request("POST", "/api/sources", autosave_body(obj, groups))
                saved = _saved_groups(answer, [g["group_id"] for g in groups])
            if _retried(entry):  # an earlier attempt may have saved to these: comments owed
                saved += [g["group_id"] for g in entry["groups"] if g["group_id"] in holding]
            await self._progress(entry, "saved", sorted(set(saved)))
            progress = entry["progress"]
        saved_to = set(progress["saved"])
        commented = set(progress.get("commented", []))
        for group in entry["groups"]:
            gid = group["group_id"]
            if gid not in saved_to or gid in commented or group.get("comment") is None:
                continue
            text = {"text": group["comment"], "group_ids": [gid]}
            await self._comment(entry, text)
            commented.add(gid)
            await self._progress(entry, "commented", sorted(commented))
        return {"saved_to": sorted(saved_to)}

    async def _followup(self, entry: Doc) -> Doc | None:
        request: Doc = entry["followup"]
        obj = entry["obj_id"]
        progress = entry.get("progress", {})
        if progress.get("created"):
            await self._followup_comment(entry, request)
            return {"action": "created"}
        existing = await self._existing_requests(obj)
        matches = [r for r in existing if _matches(request, r)]
        alias = request["priority_alias"]
        matches.sort(
            key=lambda r: (r.get("payload") or {}).get(alias, 0),
            reverse=request["priority_order"] == "desc",
        )
        if not matches:
            # no retries: a request that timed out may exist; the next attempt looks it up first
            answer = await self.sp.request(
                "POST",
                "/api/followup_request",
                request["data"],
                retry=False,
                timeout=self.cfg.skyportal.followup_timeout_s,
            )
            if (answer.data or {}).get("ignored", False):
                return {"action": "ignored"}
            await self._progress(entry, "created", True)
            await self._followup_comment(entry, request)
            return {"action": "created"}
        if _retried(entry) and request.get("comment") is not None:
            # an earlier attempt may have created the request and died before recording it:
            # its comment may still be owed (looked up before it is written)
            await self._followup_comment(entry, request)
        if not request.get("implements_update", True):
            return {"action": "exists"}
        current = matches[0]
        new_priority = request["data"]["payload"][alias]
        old_priority = (current.get("payload") or {}).get(alias)
        if "submitted" not in str(current.get("status", "")).lower() or not priority_should_update(
            old_priority, new_priority, request["priority_order"]
        ):
            return {"action": "exists"}
        body = {
            "payload": {**current.get("payload", {}), alias: new_priority},
            "obj_id": obj,
            "allocation_id": current.get("allocation_id"),
        }
        await self.sp.request("PUT", f"/api/followup_request/{current['id']}", body)
        return {"action": "updated", "request_id": current["id"]}

    async def _existing_requests(self, obj: str) -> list[Doc]:
        answer = await self.sp.request("GET", "/api/followup_request", params={"sourceID": obj})
        requests = (answer.data or {}).get("followup_requests", [])
        now = utcnow()
        kept = []
        for r in requests:
            status = str(r.get("status", "")).lower()
            if not any(s in status for s in FOLLOWUP_STATUSES):
                continue
            if "failed" in status and _older_than(r.get("modified"), now - FAILED_REQUEST_MEMORY):
                continue
            kept.append(r)
        return kept

    async def _followup_comment(self, entry: Doc, request: Doc) -> None:
        if request.get("comment") is None or entry.get("progress", {}).get("commented"):
            return
        groups = sorted({request["group_id"], *request["data"].get("target_group_ids", [])})
        body = {"text": request["comment"], "group_ids": groups}
        await self._comment(entry, body)
        await self._progress(entry, "commented", True)

    async def _comment(self, entry: Doc, body: Doc) -> None:
        """POST a comment; on a retry (an earlier attempt may have posted it and died, or lost
        the answer) only if the source has no comment with the same text and groups."""
        path = f"/api/sources/{entry['obj_id']}/comments"
        if _retried(entry):
            existing = (await self.sp.request("GET", path)).data or []
            wanted = (body["text"], sorted(body["group_ids"]))
            for comment in existing if isinstance(existing, list) else []:
                groups = comment.get("group_ids") or [
                    g.get("id") for g in comment.get("groups", [])
                ]
                if (comment.get("text"), sorted(groups)) == wanted:
                    return
        await self.sp.request("POST", path, body)


def waiting_for_setup(surveys: Sequence[str]) -> FeedSetup:
    """The set-up before SkyPortal was asked: every fed survey waits (the delivery resolves them
    on its first round)."""
    return FeedSetup({}, waiting=dict.fromkeys(fed_surveys(surveys), "not set up yet"))


def _retried(entry: Doc) -> bool:
    """Whether an earlier attempt at this entry started (it may have written before it died or
    lost the answer): then every write looks first."""
    return int(entry.get("started", 0)) > 0 or int(entry.get("attempts", 0)) > 0


def _later(value: Any, now: dt.datetime) -> bool:
    return isinstance(value, dt.datetime) and value > now


def _older_than(value: Any, limit: dt.datetime) -> bool:
    try:
        return dt.datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%S.%f") < limit
    except ValueError:
        return False  # unknown age: keep it (never re-trigger on a doubt), as upstream


def _saved_groups(answer: Answer, group_ids: list[int]) -> list[int]:
    """Groups saved to; SkyPortal names them in `saved_to_groups` (absent: all of them)."""
    saved = (answer.data or {}).get("saved_to_groups") if isinstance(answer.data, dict) else None
    if saved is None:
        return list(group_ids)
    ids = {g.get("id") if isinstance(g, dict) else g for g in saved}
    return [g for g in group_ids if g in ids]


def payload_subset(wanted: Doc, existing: Doc) -> bool:
    """Every compared key of the new payload has the same value in the existing one."""
    return all(existing.get(k) == v for k, v in wanted.items() if k not in IGNORED_PAYLOAD_KEYS)


def _matches(request: Doc, existing: Doc) -> bool:
    data = request["data"]
    if existing.get("allocation_id") != data["allocation_id"]:
        return False
    wanted = set(data.get("target_group_ids", []))
    held = {g.get("id") for g in existing.get("target_groups", [])}
    if (wanted or held) and wanted.isdisjoint(held):
        return False
    ignore = IGNORED_PAYLOAD_KEYS | {request["priority_alias"]}
    payload = {k: v for k, v in data["payload"].items() if k not in ignore}
    return payload_subset(payload, existing.get("payload") or {})


def priority_should_update(existing: Any, new: Any, order: str) -> bool:
    """asc: a higher number is more urgent; desc: a lower one."""
    try:
        return float(new) < float(existing) if order == "desc" else float(new) > float(existing)
    except (TypeError, ValueError):
        return False


class DeliveryThread:
    """The delivery task on its own event loop in a thread of the ingester process."""

    def __init__(self, cfg: Config, setup: FeedSetup) -> None:
        self.cfg = cfg
        self.setup = setup
        self.delivery: Delivery | None = None
        self.report = DeliveryReport()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name="skyportal-delivery", daemon=True)

    def start(self) -> DeliveryThread:
        self._thread.start()
        self._ready.wait(60)
        return self

    def stop(self, timeout: float = 60.0) -> DeliveryReport:
        if self._loop is not None and self.delivery is not None:
            self._loop.call_soon_threadsafe(self.delivery.stop)
        self._thread.join(timeout)
        return self.report

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        from kowalski.db import async_client

        client = async_client(self.cfg)
        try:
            async with SkyPortalClient(self.cfg) as sp:
                self._loop = asyncio.get_running_loop()
                self.delivery = Delivery(self.cfg, client[self.cfg.database.db], sp, self.setup)
                self.report = self.delivery.report
                self._ready.set()
                await self.delivery.run()
        finally:
            self._ready.set()
            await client.close()
