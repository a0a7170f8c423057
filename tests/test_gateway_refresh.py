"""Refresh under stress: 100 sessions on one account whose access token lives 3 s, against a token
endpoint that rotates refresh tokens and answers a reused one with `invalid_grant`.

The sessions are 100 running runs in the store, each with a capability, and 100 clients asking
the real cl-gateway with them, as their CLIs would, until the token was refreshed `REFRESHES`
times and every session asked a few times. Required: no `invalid_grant`, no failed request, one
refresh per expiry (never two for one token, never one long before it was due), and every
refresh written down, the last one included (the gateway stops after it).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
from test_gateway import oauth_file, running

from cl import capability
from cl.processes import start_time
from cl.store import Store
from utils import Layout, Planted, fake_api_running, write_credential

SESSIONS = 100
TOKEN_LIFE = 3.0
MARGIN = 1.0
REFRESHES = 5
ASKED = 3
"""Requests each session makes at least."""


def running_runs(layout: Layout, account: str, count: int) -> list[str]:
    """`count` running runs on `account`, each with a capability (ours: no CLI behind them)."""
    store = Store(layout.database)
    me, started = os.getpid(), start_time(os.getpid()) or ""
    held = []
    try:
        for i in range(count):
            job = store.add_job(str(layout.work), f"session {i}")
            run = store.place(job.id, account, limit=count)
            assert run is not None
            store.claim(run.id, me, started, os.devnull)
            store.set_session(run.id, str(uuid.uuid4()))
            secret = capability.new()
            store.issue_capability(capability.digest(secret), run.id)
            held.append(secret)
    finally:
        store.close()
    return held


async def keep_asking(url: str, held: list[str], enough: Callable[[], bool]) -> list[list[int]]:
    """Each capability asks about once a second until `enough()` says so and each asked `ASKED`
    times: every status the gateway answered, per session."""
    body = json.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).encode()
    statuses: list[list[int]] = [[] for _ in held]
    stop = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int, token: str) -> None:
            await asyncio.sleep(i / len(held))
            while not stop.is_set():
                headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
                async with session.post(f"{url}/v1/messages", data=body, headers=headers) as response:
                    await response.read()
                    statuses[i].append(response.status)
                await asyncio.sleep(1.0)

        async def until_enough() -> None:
            deadline = time.monotonic() + 300  # generous: an event waited for, not a speed
            while not (enough() and all(len(asked) >= ASKED for asked in statuses)):
                assert time.monotonic() < deadline, "timed out waiting for the refreshes"
                await asyncio.sleep(0.2)
            stop.set()

        await asyncio.gather(until_enough(), *(one(i, token) for i, token in enumerate(held)))
    return statuses


def test_a_hundred_sessions_one_refresher_no_invalid_grant_no_failure(
    layout: Layout, planted: Planted, tmp_path: Path
) -> None:
    expires = int((time.time() + TOKEN_LIFE) * 1000)
    with fake_api_running(tmp_path, "--token-life", str(TOKEN_LIFE)) as api:
        write_credential(layout.credentials, "a1", oauth_file(planted, expires_ms=expires))
        held = running_runs(layout, "a1", SESSIONS)
        extra = {"CL_REFRESH_MARGIN": str(MARGIN), "CL_MAX_SESSIONS_PER_ACCOUNT": str(SESSIONS)}
        with running(layout, api, **extra) as gateway:

            def refreshed() -> bool:
                return bool(sum(r["path"] == "/v1/oauth/token" for r in api.requests()) >= REFRESHES)

            statuses = asyncio.run(keep_asking(gateway.url, held, refreshed))
        log = gateway.gateway.log()  # the gateway has stopped: every refresh it began is written down
        planted.tokens += api.get("/_fake/tokens")  # what it issued may show in no log either
        refreshes = [r for r in api.requests() if r["path"] == "/v1/oauth/token"]
        messages = api.messages()
    answered = [status for session in statuses for status in session]
    assert set(answered) == {200}, sorted(set(answered))  # 0 failed requests
    assert not any(r.get("expired") for r in messages)  # no request went out on an expired token
    assert [r["outcome"] for r in refreshes] == ["ok"] * len(refreshes)  # 0 invalid_grant
    assert len({r["refresh_tail"] for r in refreshes}) == len(refreshes)  # each refresh token presented once
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(refreshes)]
    assert min(gaps) > (TOKEN_LIFE - MARGIN) / 2, gaps  # one per expiry: never a second one long before it was due
    assert len(messages) > 10 * len(refreshes)  # not one per request, nor per session
    assert log.count("token refreshed") == len(refreshes)
    current = json.loads((layout.credentials / "credentials-a1.json").read_text())["claudeAiOauth"]["refreshToken"]
    assert current[-6:] not in {r["refresh_tail"] for r in refreshes}  # the file holds the one not yet presented
