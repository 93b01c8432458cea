"""Tokens against the API served by gunicorn with two workers, as deployed (issue #22 item 1):
a token issued right after a password change works on every worker, although the other
worker's cached user still has the old token generation."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import requests

from .apiclient import (
    ADMIN,
    Api,
    gunicorn_api,  # noqa: F401  (the fixture `api`)
)

CONNECTIONS = 16  # kept-alive connections, spread over both workers by the kernel
USES = 4


def sessions() -> list[requests.Session]:
    return [requests.Session() for _ in range(CONNECTIONS)]


def statuses(api: Api, pool: list[requests.Session], token: str) -> list[int]:
    """GET / with `token` over every connection at once, USES times each."""
    headers = {"Authorization": f"Bearer {token}"}

    def use(session: requests.Session) -> list[int]:
        return [
            session.get(api.url + "/", headers=headers, timeout=30).status_code for _ in range(USES)
        ]

    with ThreadPoolExecutor(CONNECTIONS) as executor:
        return [status for answers in executor.map(use, pool) for status in answers]


def test_new_token_after_a_password_change_works_on_every_worker(api: Api) -> None:
    admin = api.token(*ADMIN)
    r = api.call("POST", "/api/users", admin, json={"username": "rotor", "password": "one"})
    assert r.status_code == 200, r.text
    pool = sessions()
    try:
        for round_ in range(3):
            old = api.token("rotor", ["one", "two"][round_ % 2])
            # every worker caches the user (with the current generation)
            assert set(statuses(api, pool, old)) == {200}
            new_password = ["two", "one"][round_ % 2]
            r = api.call("PUT", "/api/users/rotor", admin, json={"password": new_password})
            assert r.status_code == 200, r.text
            new = api.token("rotor", new_password)
            seen = statuses(api, pool, new)
            assert set(seen) == {200}, (round_, seen)
    finally:
        for session in pool:
            session.close()
        api.call("DELETE", "/api/users/rotor", admin)


def test_metrics_sum_every_worker(api: Api) -> None:
    """/metrics of the API under gunicorn with two workers counts the requests both answered
    (prometheus-client's multiprocess mode): 64 requests over 16 connections, then any worker's
    /metrics, twice, says at least 64 for that route, the same figure each time."""
    admin = api.token(*ADMIN)
    assert statuses(api, sessions(), admin) == [200] * CONNECTIONS * USES

    def served() -> float:
        r = api.call("GET", "/metrics", admin)
        assert r.status_code == 200, r.text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in r.text.splitlines()
            if line.startswith("kowalski_api_requests_total{")
            and 'route="/"' in line
            and 'status="200"' in line
        )

    first, second = served(), served()
    assert first >= CONNECTIONS * USES and second == first, (first, second)
