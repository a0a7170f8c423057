"""One refresher per account: the gateway, and nothing else, renews OAuth access tokens.

Every peer's first bug is refresh tokens rotated by two clients at once: the second refresh
presents a token the server already rotated out, gets `invalid_grant`, and the account is dead
for everyone. Here the CLIs hold capabilities, never a refresh token, and the gateway refreshes
each account ahead of expiry (`refresh_margin`), one refresh at a time per account: a request
that finds its account's token due waits for the refresh under way, or starts it.

The new tokens go into the account's file in place (`rewrite_in_place`), and only if the file
still holds the refresh token that was presented (compare-and-swap): an operator's new login,
written meanwhile, always wins. `invalid_grant` makes the account `needs-login` in the store
(keyed by a fingerprint of the refused refresh token): it gets no work until its file holds
another one. Nothing here writes a credential because of an API's 401.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog

from cl import fleet
from cl.config import Config
from cl.credentials import (
    Account,
    credential_filename,
    fingerprint_of,
    parse_credential,
    read_account,
    refresh_token,
    rewrite_in_place,
)
from cl.moments import iso_utc
from cl.registry import CredentialRegistry
from cl.store import NEEDS_LOGIN, AsyncStore, StoreUnavailable

log = structlog.get_logger("cl.gateway")

REFRESH_TIMEOUT = 30.0
SWEEP_INTERVAL = 30.0
"""Seconds between two sweeps at most, whatever the tokens' expiry says (a clock that jumped)."""
RETRY_AFTER_FAILURE = 10.0
"""Seconds before a refresh that failed (the endpoint down, an odd answer) is tried again."""


class RefreshRefused(Exception):
    """The token endpoint refused the refresh token itself (`invalid_grant`)."""


def fingerprint(account: Account) -> str | None:
    """A non-secret name for the refresh token an OAuth account holds, if it holds one."""
    refresh = refresh_token(account)
    return fingerprint_of(refresh) if refresh else None


class Refresher:
    def __init__(
        self,
        config: Config,
        registry: CredentialRegistry,
        store: AsyncStore,
        client: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self._config = config
        self._registry = registry
        self._store = store
        self._client = client
        self._under_way: dict[str, asyncio.Task[Account | None]] = {}
        self._failed_at: dict[str, float] = {}
        self._refused: dict[str, str | None] = {}
        """Account -> the fingerprint of its refresh token the endpoint refused: never presented again."""
        self._left: set[str] = set()
        """Accounts whose refresh another host of the fleet does (said once)."""
        self.refreshes = 0
        self.failures = 0
        self.refused = 0

    def due(self, account: Account, now: float | None = None) -> bool:
        """An OAuth account with a refresh token whose access token expires within the margin."""
        if refresh_token(account) is None or account.expires_at is None:
            return False
        if (name_refused := self._refused.get(account.name)) and name_refused == fingerprint(account):
            return False
        now = time.time() if now is None else now
        if now - self._failed_at.get(account.name, -RETRY_AFTER_FAILURE) < RETRY_AFTER_FAILURE:
            return account.expires_at.timestamp() <= now  # expired: worth trying at once anyway
        return account.expires_at.timestamp() - self._config.refresh_margin <= now

    async def fresh(self, account: Account) -> Account:
        """`account` with a token fit to use: refreshed first if it is due (joining a refresh of it
        already under way). If a refresh fails, the account as it was."""
        if not self.due(account):
            return account
        return await self.refresh(account.name) or account

    async def refresh(self, name: str) -> Account | None:
        """Refresh `name` now, or wait for the refresh of it under way; the account after it."""
        task = self._under_way.get(name)
        if task is None:
            task = asyncio.create_task(self._refresh(name), name=f"refresh-{name}")
            self._under_way[name] = task
            task.add_done_callback(lambda _task: self._under_way.pop(name, None))
        return await asyncio.shield(task)

    def next_due(self, now: float | None = None) -> float:
        """Seconds until the next account's token falls due (at most `SWEEP_INTERVAL`)."""
        now = time.time() if now is None else now
        soonest = SWEEP_INTERVAL
        for name, account in self._registry.accounts.items():
            if refresh_token(account) is not None and account.expires_at is not None:
                due = account.expires_at.timestamp() - self._config.refresh_margin - now
                if now - self._failed_at.get(name, -RETRY_AFTER_FAILURE) < RETRY_AFTER_FAILURE:
                    due = max(due, self._failed_at[name] + RETRY_AFTER_FAILURE - now)
                soonest = min(soonest, due)
        return max(soonest, 0.01)

    async def finish(self) -> None:
        """At shutdown: let the refreshes under way land in their files. The endpoint has rotated
        the refresh token the moment it answers; an answer nobody writes down leaves the account's
        file with a token that is dead."""
        if self._under_way:
            await asyncio.wait(list(self._under_way.values()), timeout=REFRESH_TIMEOUT)

    async def sweep(self) -> None:
        """Refresh every account that is due, idle ones too: a token is renewed ahead of expiry
        whether or not a request comes for it."""
        for name, account in list(self._registry.accounts.items()):
            if self.due(account):
                await self.refresh(name)

    async def lift_logins(self) -> bool:
        """A `needs-login` account whose file now holds another refresh token is usable again.
        True if one was."""
        lifted = False
        for name, wall in (await self._store.walls()).items():
            account = self._registry.accounts.get(name)
            if wall.kind != NEEDS_LOGIN or account is None or wall.credential is None:
                continue
            now = fingerprint(account) or ""
            if now != wall.credential and await self._store.logged_in(name, now):
                log.info("account logged in again", account=name)
                lifted = True
        return lifted

    async def _refresh(self, name: str) -> Account | None:
        path = self._config.credentials_dir / credential_filename(name)
        read = await asyncio.to_thread(read_account, path, name)  # the file as it is now, not as last seen
        if read is None:
            return None
        account = read[0]
        presented = refresh_token(account)
        if presented is None or not self.due(account):
            return account  # a new login landed meanwhile, or another kind of credential
        bound = log.bind(account=name)
        if await self._served_elsewhere(account, bound):
            return account
        try:
            tokens = await self._ask(presented)
        except RefreshRefused:
            self.refused += 1
            self._refused[name] = fingerprint(account)
            await self._store.needs_login(name, fingerprint(account) or "")
            bound.error("account needs login", state=NEEDS_LOGIN, reason="the token endpoint refused its refresh token")
            return None
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            self.failures += 1
            self._failed_at[name] = time.time()
            bound.warning("token refresh failed, will retry", error=_describe(exc))
            return None
        self._failed_at.pop(name, None)
        content: list[bytes] = []

        def swap(now: bytes) -> bytes | None:
            if refresh_token(parse_credential(name, now)) != presented:
                return None  # the file changed since it was read: that login wins
            content.append(_refreshed(now, tokens))
            return content[0]

        try:
            written = await asyncio.to_thread(rewrite_in_place, path, swap)
        except OSError as exc:
            self.failures += 1
            bound.error("refreshed token not saved", error=exc.strerror or str(exc), file=str(path))
            return None
        if written:
            self.refreshes += 1
            expires = parse_credential(name, content[0]).expires_at
            bound.info("token refreshed", expires=iso_utc(expires.timestamp()) if expires else None)
        else:
            bound.info("the account's file changed during its refresh: the new login kept")
        await self._registry.refresh({name})  # the file as it is now: the one copy of the tokens held
        return self._registry.accounts.get(name)

    async def _served_elsewhere(self, account: Account, bound: Any) -> bool:
        """Whether a live host of the fleet with a lower name holds this credential too (its file
        as read now, against what the others published: `cl.fleet`): that host refreshes it, never
        two. Not knowing (the store unavailable) is not refreshing."""
        name, identity = account.name, fleet.fingerprint(account)
        stale_after = fleet.stale_after(self._config)
        try:
            serving = identity and (
                await self._store.served_below(self._config.host_name, {identity}, stale_after)
            ).get(identity)
        except StoreUnavailable as exc:
            self._failed_at[name] = time.time()  # tried again after RETRY_AFTER_FAILURE
            bound.warning("token refresh put off: state store unavailable", error=str(exc))
            return True
        if not serving:
            self._left.discard(name)
            return False
        self._failed_at[name] = time.time()  # looked at again after RETRY_AFTER_FAILURE
        if name not in self._left:
            self._left.add(name)
            bound.warning("token refresh left to the host that serves this credential", served_by=serving)
        return True

    async def _ask(self, presented: str) -> dict[str, object]:
        """The token endpoint's answer to a refresh: the new tokens (never logged)."""
        request = {"grant_type": "refresh_token", "refresh_token": presented, "client_id": self._config.oauth_client_id}
        timeout = aiohttp.ClientTimeout(total=REFRESH_TIMEOUT)
        async with self._client().post(self._config.oauth_token_url, json=request, timeout=timeout) as response:
            body = await response.read()
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise TypeError(f"the token endpoint answered {response.status} without a JSON object")
        if answer.get("error") == "invalid_grant":
            raise RefreshRefused
        if response.status != 200 or not isinstance(answer.get("access_token"), str):
            error = answer.get("error")
            raise ValueError(
                f"the token endpoint answered {response.status} ({error if isinstance(error, str) else '?'})"
            )
        return answer


def _refreshed(content: bytes, tokens: dict[str, object]) -> bytes:
    """The credential file with the new tokens in place of the old; every other field kept."""
    document = json.loads(content)
    oauth = document["claudeAiOauth"]
    oauth["accessToken"] = tokens["access_token"]
    if isinstance(refresh := tokens.get("refresh_token"), str) and refresh:
        oauth["refreshToken"] = refresh
    expires_in = tokens.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        oauth["expiresAt"] = int((time.time() + float(expires_in)) * 1000)
    return json.dumps(document).encode()


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
