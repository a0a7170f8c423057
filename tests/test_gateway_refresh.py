"""Refresh under stress: 100 sessions on one account whose access token lives 3 s, against a token
endpoint that rotates refresh tokens and answers a reused one with `invalid_grant`.

The sessions are 100 running runs in the store, each with a capability, and 100 clients asking
the real cl-gateway with them, as their CLIs would. Required: no `invalid_grant`, no failed
request, one refresh per expiry (never two for one token, never one long before it was due).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
import uuid
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
DURATION = 12.0


def running_runs(layout: Layout, account: str, count: int) -> list[str]:
    """`count` running runs on `account`, each with a capability (ours: no CLI behind them)."""
    store = Store(layout.state / "cl.db")
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


async def keep_asking(url: str, held: list[str], until: float) -> list[int]:
    """Each capability asks once a second or so until `until`: every status the gateway answered."""
    body = json.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).encode()
    statuses: list[int] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(token: str, offset: float) -> None:
            await asyncio.sleep(offset)
            while time.monotonic() < until:
                headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
                async with session.post(f"{url}/v1/messages", data=body, headers=headers) as response:
                    await response.read()
                    statuses.append(response.status)
                await asyncio.sleep(1.0)

        await asyncio.gather(*(one(token, i / len(held)) for i, token in enumerate(held)))
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
            statuses = asyncio.run(keep_asking(gateway.url, held, time.monotonic() + DURATION))
            log = gateway.gateway.log()
        planted.tokens += api.get("/_fake/tokens")  # what it issued may show in no log either
        refreshes = [r for r in api.requests() if r["path"] == "/v1/oauth/token"]
        messages = api.messages()
    assert len(statuses) >= SESSIONS * (DURATION - 2)  # every session kept asking
    assert set(statuses) == {200}, sorted(set(statuses))  # 0 failed requests
    assert not any(r.get("expired") for r in messages)  # no request went out on an expired token
    assert [r["outcome"] for r in refreshes] == ["ok"] * len(refreshes)  # 0 invalid_grant
    assert len({r["refresh_tail"] for r in refreshes}) == len(refreshes)  # each refresh token presented once
    expected = DURATION / (TOKEN_LIFE - MARGIN)
    assert expected - 2 <= len(refreshes) <= expected + 2, len(refreshes)  # one per expiry, not one per session
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(refreshes)]
    assert min(gaps) > (TOKEN_LIFE - MARGIN) / 2, gaps  # never a second refresh long before the next was due
    assert log.count("token refreshed") == len(refreshes)
