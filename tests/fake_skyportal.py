"""An in-test SkyPortal: the endpoints the broker feed calls, with state, a log of every request,
and faults on demand (an HTTP status without processing, a slow answer after processing, down).

It runs on its own event loop in a thread, so synchronous tests (the Kafka ingester) can use it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from kowalski.services.process import free_port

Doc = dict[str, Any]
TOKEN = "test-token"
BODY: web.RequestKey[Doc | None] = web.RequestKey("body")
ZTF_STREAMS = [
    {"id": 11, "name": "ZTF Public"},
    {"id": 12, "name": "ZTF Public+Partnership"},
    {"id": 13, "name": "ZTF Public+Partnership+Caltech"},
]


@dataclass
class Fault:
    method: str
    path: str  # prefix of the request path
    status: int | None = None  # answer this status without processing
    delay: float = 0.0  # or process, then wait this long before answering
    count: int = 1
    when: Callable[[Doc], bool] = lambda body: True


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str]
    answered: int = 0  # status of the answer (0: faulted before processing)


@dataclass
class State:
    instruments: list[Doc] = field(default_factory=lambda: [{"id": 7, "name": "ZTF"}])
    streams: list[Doc] = field(default_factory=lambda: list(ZTF_STREAMS))
    groups: dict[int, Doc] = field(default_factory=dict)
    candidates: dict[str, list[Doc]] = field(default_factory=lambda: defaultdict(list))
    sources: dict[str, set[int]] = field(default_factory=dict)
    annotations: dict[str, list[Doc]] = field(default_factory=lambda: defaultdict(list))
    photometry: dict[str, list[Doc]] = field(default_factory=lambda: defaultdict(list))
    thumbnails: dict[tuple[str, str], str] = field(default_factory=dict)
    comments: dict[str, list[Doc]] = field(default_factory=lambda: defaultdict(list))
    followups: list[Doc] = field(default_factory=list)


def ok(data: Any = None) -> web.Response:
    return web.json_response({"status": "success", "data": data if data is not None else {}})


def error(status: int, message: str) -> web.Response:
    return web.json_response({"status": "error", "message": message}, status=status)


class FakeSkyPortal:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.state = State()
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle
    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def start(self) -> FakeSkyPortal:
        self._call(self._start())
        return self

    def stop(self) -> None:
        """SkyPortal goes down: connections are refused until `start()`."""
        self._call(self._stop())

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/api/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ helpers for tests
    def add_group(self, group_id: int, name: str, filters: dict[int, str]) -> None:
        self.state.groups[group_id] = {
            "id": group_id,
            "name": name,
            "nickname": None,
            "filters": [{"id": i, "name": n} for i, n in filters.items()],
        }

    def fault(self, fault: Fault) -> None:
        self.faults.append(fault)

    def processed(self, method: str | None = None, prefix: str = "") -> list[Request]:
        """Requests that were processed (answered by the handlers, whatever the status)."""
        return [
            r
            for r in self.requests
            if r.answered and (method is None or r.method == method) and r.path.startswith(prefix)
        ]

    def writes(self) -> list[Request]:
        return [r for r in self.processed() if r.method not in ("GET", "HEAD")]

    # ------------------------------------------------------------------ server
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        record = Request(
            request.method, request.path, dict(request.query), body, dict(request.headers)
        )
        self.requests.append(record)
        request[BODY] = body
        if request.headers.get("Authorization") != f"token {TOKEN}":
            record.answered = 401
            return error(401, "Unauthorized")
        delay = 0.0
        for fault in self.faults:
            if (
                fault.count > 0
                and fault.method == request.method
                and request.path.startswith(fault.path)
                and fault.when(body or {})
            ):
                fault.count -= 1
                if fault.status is not None:
                    return error(fault.status, "injected fault")
                delay = fault.delay
                break
        response = await handler(request)
        record.answered = response.status
        if delay:
            await asyncio.sleep(delay)
        return response

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")[1:]
        method, body = request.method, request[BODY] or {}
        s = self.state
        match (method, parts):
            case ("GET", ["instrument"]):
                name = request.query.get("name")
                return ok([i for i in s.instruments if i["name"] == name])
            case ("GET", ["streams"]):
                return ok(s.streams)
            case ("GET", ["groups", gid]):
                group = s.groups.get(int(gid))
                return ok(group) if group else error(404, f"no group {gid}")
            case ("HEAD", ["candidates", obj]):
                return web.Response(status=200 if obj in s.candidates else 404)
            case ("HEAD", ["sources", obj]):
                return web.Response(status=200 if obj in s.sources else 404)
            case ("POST", ["candidates"]):
                s.candidates[body["id"]].append(body)
                return ok({"ids": [next(self.ids)]})
            case ("GET", ["sources", obj, "annotations"]):
                return ok(s.annotations.get(obj, []))
            case ("POST", ["sources", obj, "annotations"]):
                if any(a["origin"] == body["origin"] for a in s.annotations[obj]):
                    return error(400, "annotation with this origin exists")
                s.annotations[obj].append({**body, "id": next(self.ids), "author_id": 1})
                return ok({"annotation_id": s.annotations[obj][-1]["id"]})
            case ("PUT", ["sources", obj, "annotations", aid]):
                for a in s.annotations[obj]:
                    if a["id"] == int(aid):
                        a.update(body)
                        return ok()
                return error(404, "no annotation")
            case ("PUT", ["photometry"]):
                s.photometry[body["obj_id"]].append({**body, "query": dict(request.query)})
                return ok({"ids": list(range(len(body["mjd"])))})
            case ("POST", ["thumbnail"]):
                s.thumbnails[(body["obj_id"], body["ttype"])] = body["data"]
                return ok({"id": next(self.ids)})
            case ("POST", ["sources"]):
                return ok(self._save(body))
            case ("GET", ["sources", obj, "groups"]):
                if obj not in s.sources:
                    return error(400, "no source")
                return ok([{"id": g} for g in sorted(s.sources[obj])])
            case ("GET", ["sources", obj, "comments"]):
                return ok(s.comments.get(obj, []))
            case ("POST", ["sources", obj, "comments"]):
                s.comments[obj].append(body)
                return ok({"comment_id": next(self.ids)})
            case ("GET", ["followup_request"]):
                source_id = request.query.get("sourceID")
                found = [f for f in s.followups if f["obj_id"] == source_id]
                return ok({"followup_requests": found, "totalMatches": len(found)})
            case ("POST", ["followup_request"]):
                request_doc = {
                    "id": next(self.ids),
                    "obj_id": body["obj_id"],
                    "allocation_id": body["allocation_id"],
                    "payload": body["payload"],
                    "target_groups": [{"id": g} for g in body.get("target_group_ids", [])],
                    "status": "submitted",
                }
                s.followups.append(request_doc)
                return ok({"id": request_doc["id"]})
            case ("PUT", ["followup_request", rid]):
                for f in s.followups:
                    if f["id"] == int(rid):
                        f["payload"] = body["payload"]
                        return ok()
                return error(404, "no request")
        return error(404, f"not implemented: {method} {request.path}")

    def _save(self, body: Doc) -> Doc:
        obj = body["id"]
        held = self.state.sources.setdefault(obj, set())
        ignore = body.get("ignore_if_in_group_ids") or {}
        saved = []
        for gid in body["group_ids"]:
            if set(ignore.get(str(gid), [])) & held:
                continue
            held.add(gid)
            saved.append(gid)
        return {"id": obj, "saved_to_groups": saved}
