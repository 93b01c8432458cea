"""An async HTTP client for one SkyPortal instance (aiohttp).

- `Authorization: token <skyportal.token>` and `User-Agent: Kowalski <version>` on every call.
- At most `skyportal.max_connections` requests in flight to the host; a timeout per request.
- 405/429/5xx answers, timeouts and connection errors are retried `skyportal.retries` times with
  exponential backoff (`skyportal.backoff_s`), as upstream's urllib3 `Retry`. A caller that must
  never repeat a request (creating a follow-up request) passes `retry=False`.
- What is still failing after that raises `Deferred` (try again later, nothing was decided);
  any other non-2xx answer, or a JSON body whose `status` is not "success", raises `Rejected`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

from kowalski.config import ROOT, Config
from kowalski.retry import backoff

log = logging.getLogger("kowalski.skyportal")
RETRY_STATUSES = frozenset({405, 429, 500, 502, 503, 504})
# methods that may be sent again after an answer was lost (a POST may have landed: not again)
REPEATABLE = frozenset({"GET", "HEAD", "PUT", "DELETE"})


class Deferred(Exception):
    """SkyPortal could not be asked now (down, slow, overloaded): try again later."""


class Rejected(Exception):
    """SkyPortal answered and refused: retrying the same request will not help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any

    @property
    def data(self) -> Any:
        return self.body.get("data") if isinstance(self.body, dict) else None


def kowalski_version(cfg: Config) -> str:
    """`version.txt` (written by `kowalski.py build`) if present, else v<server.version>."""
    path = ROOT / "version.txt"
    if path.exists():
        return path.read_text().strip()
    return f"v{cfg.server.version}"


def base_url(cfg: Config) -> str:
    sp = cfg.skyportal
    return f"{sp.protocol}://{sp.host}:{sp.port}"


def _never_sent(exc: BaseException) -> bool:
    """A request that cannot have reached SkyPortal (no connection was made)."""
    return isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError)


def _message(body: Any, fallback: str) -> str:
    if isinstance(body, dict):
        return str(body.get("message") or (body.get("data") or {}).get("message") or fallback)
    return str(body or fallback)[:300]


class SkyPortalClient:
    """One session per event loop; use as `async with SkyPortalClient(cfg) as sp:`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.url = base_url(cfg)
        self.headers = {
            "Authorization": f"token {cfg.skyportal.token or ''}",
            "User-Agent": f"Kowalski {kowalski_version(cfg)}",
        }
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SkyPortalClient:
        connector = aiohttp.TCPConnector(limit_per_host=self.cfg.skyportal.max_connections)
        self._session = aiohttp.ClientSession(connector=connector, headers=self.headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        retry: bool = True,
        timeout: float | None = None,
    ) -> Answer:
        """One call; HEAD answers any status, other methods raise `Rejected` unless 2xx/success."""
        sp = self.cfg.skyportal
        attempts = 1 + (sp.retries if retry else 0)
        reason = ""
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(backoff(attempt, sp.backoff_s))
            try:
                answer = await self._once(method, path, body, params, timeout or sp.timeout_s)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if method not in REPEATABLE and not _never_sent(exc):
                    # the server may have acted on it: the caller's next attempt looks first
                    raise Deferred(f"{method} {path}: {reason} (answer lost)") from None
                continue
            if answer.status in RETRY_STATUSES:
                reason = f"HTTP {answer.status}: {_message(answer.body, 'no message')}"
                continue
            return self._checked(method, answer)
        raise Deferred(f"{method} {path}: {reason} (after {attempts} attempts)")

    async def _once(
        self, method: str, path: str, body: Any, params: dict[str, str] | None, timeout: float
    ) -> Answer:
        assert self._session is not None, "use SkyPortalClient as an async context manager"
        async with self._session.request(
            method,
            self.url + path,
            json=body if method not in ("GET", "HEAD") else None,
            params=params,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            if method == "HEAD":
                return Answer(response.status, None)
            try:
                payload: Any = await response.json(content_type=None)
            except ValueError:
                payload = await response.text()
            return Answer(response.status, payload)

    @staticmethod
    def _checked(method: str, answer: Answer) -> Answer:
        if method == "HEAD":
            return answer
        if answer.status == 401:
            # a revoked or wrong token is an operator's problem: keep the posts for later
            raise Deferred(
                f"HTTP 401: {_message(answer.body, 'unauthorized')} (check skyportal.token)"
            )
        if answer.status >= 300:
            raise Rejected(answer.status, _message(answer.body, "no message"))
        if isinstance(answer.body, dict) and answer.body.get("status", "success") != "success":
            raise Rejected(answer.status, _message(answer.body, "status is not success"))
        return answer
