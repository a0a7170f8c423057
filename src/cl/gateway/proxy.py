"""The gateway's requests: a CLI's capability in, the real credential out, the API's word kept.

A request is taken only with a capability whose run is running now (`Store.capability_run`),
and only on the paths the CLI uses for inference (`ALLOWED`): never a token endpoint, never
anything else. It goes upstream with the credential of the account the store names for that run
at this moment (an OAuth bearer, or `x-api-key` for an API key), refreshed first if it is due.
Every response's rate-limit headers are kept as that account's usage; its prompt-cache tokens as
the run's.

A session whose account has a window past `move_at` (as the API's last answer said) may move
early: before its next request goes out, the rescuer is asked (`Mover`, with that window) and
decides on the store's windows; the request goes on as the run it answers.

A 429 whose unified status is `rejected` walls the account until the reset the API names (a 401,
its credential refused, benches it for `wall_retry`). The rescuer is asked to move the session
in flight (its decision, a live move in the store); if it does, the same request goes again on
the new account and the CLI never sees the 429. If the wall resets sooner than a move would repay
the session (its context written cold on the new account: the rescuer weighs it, from the
context its last answer measured), the request waits for the reset instead and goes again on the
same account. If no account has room, the 429 goes through: the CLI's turn ends on the wall and
the worker holds it.
A response streams through chunk by chunk, as it arrives; an error body is buffered (bounded)
and scrubbed of every known secret. Bodies are never logged.

In a fleet (`fleet_listen`), a run whose account has no file here goes to that account's home
host's gateway, over TLS both ways, capability and all (`Homes`); that gateway takes it as a
CLI's request (`handle_for_the_fleet`), never forwards it on, and records what the API said. A
home that cannot be reached, or cannot reach its store (503), is cut off from this host.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from cl import capability, redact
from cl.credentials import Account, CredentialKind
from cl.gateway import limits
from cl.gateway.homes import CONNECT_TIMEOUT, Homes
from cl.gateway.refresher import Refresher
from cl.moments import iso_utc
from cl.registry import CredentialRegistry
from cl.store import UNSET, AsyncStore, Home, Lookup, Run, StoreUnavailable

log = structlog.get_logger("cl.gateway")

ALLOWED = frozenset({("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens")})
"""What a CLI may ask for: inference, and counting its tokens. Everything else is refused."""
MAX_BODY = 32 * 1024 * 1024
"""A request body's limit: the CLI sends the whole conversation, which can run to megabytes."""
MAX_ERROR_BODY = 1024 * 1024
HEAD_BYTES = 2048
"""How much of a response is searched for its prompt-cache tokens: `message_start`, the first
event of a stream, carries them (a JSON body's `usage` comes after its content: not counted)."""
MAX_MOVES = 3
"""Moves in flight one request may make before its 429 goes through."""
OAUTH_BETA = "oauth-2025-04-20"
QUOTA_CHECK = json.dumps(
    {
        "model": "claude-opus-5-5",
        "max_tokens": 1,
        "system": "You are Claude Code, Anthropic's official CLI for Claude.",
        "messages": [{"role": "user", "content": "quota"}],
    }
).encode()
"""The CLI's own quota check (2.1.332, read from its code: `source:"quota_check"`), with the
model it runs by default (measured): every answer carries the account's unified windows."""
PROBE_TIMEOUT = 30.0
HELD_KEPT = 4096
"""Runs whose last early-move answer (stay) is remembered, so that it is not asked at every request."""
SET_BY_THE_RELAY = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding",
     "upgrade", "host", "content-length"}
)  # fmt: skip
"""Hop-by-hop headers, and those each side's HTTP layer writes itself (host, length)."""
NOT_FROM_THE_CLI = SET_BY_THE_RELAY | {
    "authorization",
    "x-api-key",
    "cookie",
    "accept-encoding",
    "forwarded",
    "x-forwarded-for",
}
"""Request headers never passed on: the CLI's capability, and what upstream must decide itself."""
NOT_TO_THE_CLI = SET_BY_THE_RELAY | {"set-cookie", "authorization", "x-api-key", "www-authenticate", "content-encoding"}


@dataclasses.dataclass(frozen=True, slots=True)
class WaitUntil:
    """The rescuer's answer that a session should wait for its account's reset, at `at`, and not move."""

    at: float


Mover = Callable[[Run, str | None, int | None], Awaitable[Run | WaitUntil | None]]
"""Ask the rescuer to move a running run's session in flight (early: the window of its account
past `move_at`, before its next request goes out; with the session's context in tokens, for the
move's cost); the run it goes on as, a wait for the reset, or None."""


@dataclasses.dataclass(frozen=True, slots=True)
class Refused:
    """The run's account cannot answer: the session is to move. `answer`: the API's refusal (a
    wall, a refused credential), sent to the CLI if it cannot; None: the account is not usable."""

    answer: web.StreamResponse | None
    cut_off: str | None = None
    """The home host this gateway could not reach: `answer` is its own wall, not the API's."""


class Counts:
    """What the gateway counted since it started (its `metrics` request)."""

    def __init__(self) -> None:
        self.forwarded = 0
        self.refused: dict[str, int] = {"capability": 0, "path": 0}
        self.walls = 0
        self.moves = 0
        self.walls_passed = 0
        self.early_moves = 0
        self.upstream_errors = 0


class Recorder:
    """Usage and cache tokens, written to the store every `interval`, the latest of each (the
    request path never waits on a write); walls go at once, elsewhere."""

    def __init__(self, store: AsyncStore, burn_step: float, interval: float = 0.5) -> None:
        self._store = store
        self._burn_step = burn_step
        self._interval = interval
        self._usage: dict[str, tuple[dict[str, float], dict[str, float], float, bool]] = {}
        """Account -> its windows' utilization and resets as last reported, when, and whether
        only the probe of an idle account reported them since the last write."""
        self._cache: dict[int, tuple[int, int]] = {}

    def usage(self, account: str, reading: limits.Reading, *, idle: bool = False) -> None:
        """`idle`: the answer was to the probe of an idle account, not a use of it."""
        windows, resets, _, was_idle = self._usage.get(account, ({}, {}, 0.0, True))
        self._usage[account] = (
            {**windows, **reading.utilization},
            {**resets, **reading.resets},
            time.time(),
            was_idle and idle,
        )

    def cache(self, run_id: int, read: int, created: int) -> None:
        if read or created:
            before = self._cache.get(run_id, (0, 0))
            self._cache[run_id] = (before[0] + read, before[1] + created)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        usage, cache = self._usage, self._cache
        if not (usage or cache):
            return
        self._usage, self._cache = {}, {}
        try:
            for account, (windows, resets, when, idle) in usage.items():
                await self._store.record_usage(
                    account, windows, when, resets=resets, burn_step=self._burn_step, idle=idle
                )
            if cache:
                await self._store.record_cache(cache)
        except StoreUnavailable as exc:
            log.warning("usage not recorded: state store unavailable", error=str(exc))


class Proxy:
    def __init__(
        self,
        *,
        upstream: str,
        wall_retry: float,
        store: AsyncStore,
        lookup: Lookup | None,
        registry: CredentialRegistry,
        refresher: Refresher,
        recorder: Recorder,
        move: Mover,
        client: Callable[[], aiohttp.ClientSession],
        move_at: float = 1.0,
    ) -> None:
        self._upstream = upstream
        self._wall_retry = wall_retry
        self._store = store
        self._lookup = lookup
        self._registry = registry
        self._refresher = refresher
        self._recorder = recorder
        self._move = move
        self._client = client
        self._move_at = move_at
        self._readings: dict[str, limits.Reading] = {}
        """Account -> the API's last word on its windows (for early moves)."""
        self._held: dict[int, float] = {}
        """Run -> its window's utilization when the rescuer last kept it where it is."""
        self._context: dict[int, int] = {}
        """Job -> the prompt-cache tokens of its session's last answer (read and written): what a
        move would write cold on the new account."""
        self.homes: Homes | None = None
        """Set when this host reaches the fleet's accounts (`fleet_listen`)."""
        self.counts = Counts()
        self._overage: dict[str, float] = {}
        """Accounts this gateway walled for paid overage, until when: no request of theirs goes to
        the API meanwhile (a session on one is moved as on a wall)."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """A CLI's request (on `gateway_listen`)."""
        taken = await self._taken(request, unavailable=529)  # an overloaded API: the CLI tries again later
        if isinstance(taken, web.StreamResponse):
            return taken
        run, digest, body = taken
        if request.path == "/v1/messages":
            run = await self._early(run)
        moves = 0
        while True:
            outcome = await self._attempt(request, run, body)
            if not isinstance(outcome, Refused):
                return outcome
            moved = await self._moved(run, digest) if moves < MAX_MOVES else None
            if isinstance(moved, WaitUntil):  # its account's reset comes sooner than a move repays
                await asyncio.sleep(max(0.0, moved.at - time.time()))
                moves += 1  # a wait counts as a move: MAX_MOVES bounds a request's tries, whatever they were
                continue
            if moved is None:
                if outcome.answer is None:
                    return _error(529, "overloaded_error", "no account can serve this session now")
                if outcome.cut_off is not None:  # the worker believes the CLI's wall for this turn only
                    with contextlib.suppress(StoreUnavailable):
                        await self._store.answered_as_wall(run, outcome.cut_off)
                self.counts.walls_passed += 1
                return outcome.answer
            if outcome.answer is not None:
                self.counts.moves += 1
                log.info(
                    "request moved in flight",
                    job=run.job_id,
                    run=moved.id,
                    account=moved.account,
                    **{"from": run.account},
                )
            run, moves = moved, moves + 1

    async def handle_for_the_fleet(self, request: web.Request) -> web.StreamResponse:
        """Another host's gateway forwarding a request of its CLI (on `fleet_listen`, its TLS
        certificate checked) to an account whose home is here. Never forwarded on, never moved:
        a wall is recorded here and the refusal goes back, for that host to move the session."""
        taken = await self._taken(request, unavailable=503)  # not the API's: that host moves the session
        if isinstance(taken, web.StreamResponse):
            return taken
        run, _digest, body = taken
        account = await self._account(run.account)
        if account is None or not account.usable:
            return _error(421, "not_found_error", f"account {run.account} is not served by this host")
        outcome = await self._ask_api(request, run, account, body)
        if isinstance(outcome, Refused):
            assert outcome.answer is not None, "the API's own refusal"
            return outcome.answer
        return outcome

    async def _taken(self, request: web.Request, *, unavailable: int) -> tuple[Run, str, bytes] | web.StreamResponse:
        """The request's run (by the capability presented), the capability's digest and the body;
        or the answer refusing it (`unavailable`: its status when the store cannot be reached)."""
        if request.method == "HEAD" and request.path == "/":
            return web.Response()  # the CLI's preflight: nothing to forward
        if (request.method, request.path) not in ALLOWED:
            self.counts.refused["path"] += 1
            log.info("request refused: not an API path the CLI uses", method=request.method, path=request.path[:200])
            return _error(404, "not_found_error", "cl-gateway forwards only the API paths Claude Code uses")
        presented = _presented(request)
        digest = capability.digest(presented) if presented else ""
        try:
            run = await self._run_holding(digest) if presented else None
        except StoreUnavailable as exc:
            log.warning("request refused: state store unavailable", error=str(exc))
            return _error(unavailable, "overloaded_error", "cl-gateway cannot reach its state store")
        if run is None:
            self.counts.refused["capability"] += 1
            return _error(401, "authentication_error", "no running session holds this capability")
        return run, digest, await request.read()

    async def _run_holding(self, digest: str) -> Run | None:
        """The running run that holds this capability: read on the loop (SQLite, about 25 us), or
        on the store's thread when the file is locked or the store is a server."""
        if self._lookup is not None:
            with contextlib.suppress(StoreUnavailable):
                return self._lookup.capability_run(digest)
        return await self._store.capability_run(digest)

    async def _attempt(self, request: web.Request, run: Run, body: bytes) -> web.StreamResponse | Refused:
        """The request on the run's account: here if its file is here, else through its home's
        gateway if another live host of the fleet serves it."""
        account = await self._account(run.account)
        if account is not None and account.usable:
            if (until := self._overage.get(account.name, 0.0)) > time.time():
                said = f"cl: account {account.name} has used up its windows, and paid overage is not allowed for it"
                return Refused(_wall_until(until, said))
            return await self._ask_api(request, run, account, body)
        if self.homes is not None and (home := await self.homes.of(run.account)) is not None:
            return await self._ask_home(request, run, home, body)
        return Refused(None)

    async def _ask_api(
        self, request: web.Request, run: Run, account: Account, body: bytes
    ) -> web.StreamResponse | Refused:
        """The request to the API with the account's credential: the answer relayed, or the
        account walled (recorded) and the API's refusal returned unsent."""
        account = await self._refresher.fresh(account)
        try:
            upstream = await self._client().request(
                request.method, self._upstream + _path(request), headers=_outbound(request.headers, account), data=body
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.counts.upstream_errors += 1
            log.warning("upstream unreachable", account=account.name, run=run.id, error=_said(exc))
            return _error(529, "overloaded_error", "the API cannot be reached from cl-gateway")
        reading = limits.read(upstream.headers, time.time())
        self._heard(account.name, reading, upstream.status)
        if not _refused(upstream.status, reading):
            self.counts.forwarded += 1
            if reading.overage:
                await self._overage_used(account, run, reading)
            return await self._relay(request, upstream, run)
        refusal = await self._relay(request, upstream, None)  # an error: read whole, not sent yet
        await self._wall(account, run, reading, refusal)
        return Refused(refusal)

    async def _ask_home(self, request: web.Request, run: Run, home: Home, body: bytes) -> web.StreamResponse | Refused:
        """The request to the gateway of the account's home host, over TLS both ways, with the
        CLI's capability (that gateway takes it to the run as this one did): the answer relayed.
        A wall or refused credential was recorded there; here the session is moved. A home that
        cannot be reached is cut off from this host (`Homes.unreachable`) and answered as a wall
        until then: moved if another account has room, else the CLI's turn ends and it waits."""
        assert self.homes is not None
        try:
            async with asyncio.timeout(self.homes.answer_timeout):  # a silent link is cut off too
                upstream = await self._client().request(
                    request.method,
                    f"https://{home.gateway}{_path(request)}",
                    headers=_to_home(request.headers),
                    data=body,
                    ssl=self.homes.tls,
                    server_hostname=home.host,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=900),
                )
        except aiohttp.ClientError as exc:  # its own timeouts (connecting, reading) included
            return await self._cut_off(home, run, _said(exc))
        except TimeoutError:
            return await self._cut_off(home, run, f"no answer in {self.homes.answer_timeout:g} s")
        if upstream.status == 503:  # that gateway cannot reach the store (cut off from it)
            upstream.release()
            return await self._cut_off(home, run, "it cannot reach its state store")
        await self.homes.reachable(home)
        if upstream.status == 421:  # its file went from there meanwhile
            upstream.release()
            return Refused(None)
        if not _refused(upstream.status, limits.read(upstream.headers, time.time())):
            self.counts.forwarded += 1
            return await self._relay(request, upstream, None)  # its prompt-cache tokens counted there
        return Refused(await self._relay(request, upstream, None))

    async def _cut_off(self, home: Home, run: Run, error: str) -> Refused:
        """`home` cannot serve its accounts' requests from here: cut off, and the request answered
        as a wall until then (the session moves, or waits)."""
        assert self.homes is not None
        self.counts.upstream_errors += 1
        until = await self.homes.unreachable(home, run.account, error)
        said = f"cl: the home of account {run.account} ({home.host}) cannot be reached from this host"
        return Refused(_wall_until(until, said), cut_off=home.host)

    async def _overage_used(self, account: Account, run: Run, reading: limits.Reading) -> None:
        """The API billed this answer as paid overage (it is relayed: it was paid for). Unless the
        operator allowed overage for the account, it is walled until its window resets, and no
        request of its goes to the API meanwhile."""
        if self._overage.get(account.name, 0.0) > time.time():
            return
        try:
            allowed = (await self._store.settings()).get(account.name, UNSET).allow_overage
        except StoreUnavailable:
            allowed = False  # not known: no more paid answers until it is
        if allowed:
            return
        until = reading.reset or time.time() + self._wall_retry
        self._overage[account.name] = until
        with contextlib.suppress(StoreUnavailable):  # walled here all the same
            await self._store.record_wall(account.name, "api", until, "overage")
        log.warning("paid overage used: account walled", account=account.name, job=run.job_id, until=iso_utc(until))

    async def _early(self, run: Run) -> Run:
        """The run a session goes on as: moved early if its account crossed `move_at` and the
        rescuer says so. Asked again for the same run only once the window has filled further."""
        if (crossed := self._crossed(run.account)) is None:
            return run
        window, used = crossed
        if self._held.get(run.id, -1.0) >= used:
            return run
        await self._recorder.flush()  # the rescuer decides on the windows the store holds
        if not isinstance(moved := await self._move(run, window, self._context.get(run.job_id)), Run):
            if len(self._held) >= HELD_KEPT:
                self._held.clear()  # at worst, a question asked again
            self._held[run.id] = used
            return run
        self.counts.early_moves += 1
        log.info("session moved early", job=run.job_id, run=moved.id, account=moved.account,
                 **{"from": run.account, "window": window})  # fmt: skip
        return moved

    def _heard(self, account: str, reading: limits.Reading, status: int, *, idle: bool = False) -> None:
        """What an answer's headers said of `account`'s windows: recorded, and kept for early
        moves unless the answer refused it (a wall is the wall's to act on, not an early move's).
        `idle`: the answer was to the probe of an idle account, which does not count as a use."""
        self._recorder.usage(account, reading, idle=idle)
        if _refused(status, reading):
            self._readings.pop(account, None)
        else:
            self._readings[account] = reading

    def _crossed(self, account: str) -> tuple[str, float] | None:
        """The window of `account` past `move_at`, and its utilization, as the API's last answer
        said them (or the one it warned of, `allowed_warning`), while that window stands."""
        reading = self._readings.get(account)
        if reading is None or self._move_at >= 1.0:
            return None
        now = time.time()
        standing = {window: used for window, used in reading.utilization.items() if reading.resets.get(window, 0) > now}
        if reading.status == "allowed_warning" and reading.claim in standing:
            return reading.claim, standing[reading.claim]
        crossed = [(used, window) for window, used in standing.items() if used >= self._move_at]
        if not crossed:
            return None
        used, window = max(crossed)
        return window, used

    async def probe(self, account: Account) -> None:
        """Read an idle account's windows with the request the CLI itself sends to check its
        quota (2.1.332's `quota_check`: one user message "quota", one token at most): its
        answer's unified headers are recorded as any answer's are, and a wall among them walls."""
        account = await self._refresher.fresh(account)
        asked = {"content-type": "application/json", "anthropic-version": "2023-06-01", "anthropic-beta": OAUTH_BETA}
        try:
            async with self._client().post(
                f"{self._upstream}/v1/messages?beta=true",
                headers=_outbound(CIMultiDictProxy(CIMultiDict(asked)), account),
                data=QUOTA_CHECK,
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT),
            ) as upstream:
                reading = limits.read(upstream.headers, time.time())
                status = upstream.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("idle account not read: the API cannot be reached", account=account.name, error=_said(exc))
            return
        if not reading.utilization:
            log.info("idle account not read: no windows in the answer", account=account.name, status=status)
            return
        self._heard(account.name, reading, status, idle=True)
        if status == 429 and reading.rejected:
            await self._store.record_wall(account.name, "api", reading.reset or time.time() + self._wall_retry,
                                          reading.claim)  # fmt: skip
        log.info("idle account read", account=account.name, status=reading.status,
                 **{f"{w}_utilization": u for w, u in reading.utilization.items()})  # fmt: skip

    async def _account(self, name: str) -> Account | None:
        """The account the store names for a run, from the registry; read from its file again if
        the registry lacks it (a move onto a file that just landed may reach here first)."""
        if (account := self._registry.accounts.get(name)) is None or not account.usable:
            await self._registry.refresh({name})
            account = self._registry.accounts.get(name)
        return account

    async def _moved(self, run: Run, digest: str) -> Run | WaitUntil | None:
        """The run the session goes on as on another account: the rescuer's move, or the one it
        made already for a request of the same CLI that met the wall at the same time; or the
        rescuer's word to wait for the account's reset."""
        if (moved := await self._move(run, None, self._context.get(run.job_id))) is not None:
            return moved
        now = await self._run_holding(digest)
        return now if now is not None and now.id != run.id and now.account != run.account else None

    async def _wall(self, account: Account, run: Run, reading: limits.Reading, refusal: web.StreamResponse) -> None:
        """The API walled `account` (a usage wall; or a 401, its credential refused: benched for
        `wall_retry`, and nothing written to its file), recorded before anyone is asked to move."""
        self.counts.walls += 1
        refused = refusal.status == 401
        reset = time.time() + self._wall_retry if refused or not reading.reset else reading.reset
        await self._store.record_wall(account.name, "api", reset, "unauthorized" if refused else reading.claim)
        said = _api_error(refusal.body if isinstance(refusal, web.Response) else None)
        log.warning(
            "wall from the API",
            account=account.name,
            job=run.job_id,
            run=run.id,
            resets=iso_utc(reset),
            claim=reading.claim,
            **said,
        )

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, run: Run | None
    ) -> web.StreamResponse:
        """The response, to the CLI: streamed as it comes; an error read whole (bounded),
        scrubbed, and returned unsent."""
        async with upstream:
            headers = _to_the_cli(upstream.headers)
            if upstream.status >= 300:
                data = await upstream.content.read(MAX_ERROR_BODY)
                return web.Response(
                    status=upstream.status, body=redact.scrub(data.decode(errors="replace")).encode(), headers=headers
                )
            response = web.StreamResponse(status=upstream.status, headers=headers)
            await response.prepare(request)
            head = bytearray()
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                    if len(head) < HEAD_BYTES:
                        head += chunk[: HEAD_BYTES - len(head)]
                await response.write_eof()
            except (aiohttp.ClientError, TimeoutError) as exc:  # the API's side broke off: so does the CLI's
                self.counts.upstream_errors += 1
                log.warning("the API's answer broke off", run=run.id if run else None, error=_said(exc))
                response.force_close()
            except ConnectionError:  # the CLI went away: its answer is dropped with it
                log.info("the CLI went away during its answer", run=run.id if run else None)
                response.force_close()
        if run is not None:
            read, written = limits.cache_tokens(bytes(head))
            self._recorder.cache(run.id, read, written)
            if read + written:
                if len(self._context) >= HELD_KEPT and run.job_id not in self._context:
                    self._context.clear()  # at worst, a move not weighed against a wait
                self._context[run.job_id] = read + written
        return response


def _path(request: web.Request) -> str:
    """The path, checked against ALLOWED, as it was checked, with its query."""
    query = request.rel_url.raw_query_string
    return request.path + (f"?{query}" if query else "")


def _refused(status: int, reading: limits.Reading) -> bool:
    """The API's answer walls the account (a usage wall), or refuses its credential."""
    return (status == 429 and reading.rejected) or status == 401


def _said(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _to_the_cli(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The response's headers for the CLI: not the hop-by-hop ones nor any about credentials, and
    none carrying a known token (scrubbed in one pass over them all; one by one only if one does)."""
    kept = [(k, v) for k, v in upstream.items() if k.lower() not in NOT_TO_THE_CLI]
    joined = "\n".join(v for _, v in kept)
    if redact.scrub(joined) != joined:
        kept = [(k, redact.scrub(v)) for k, v in kept]
    return CIMultiDict(kept)


def _api_error(body: object) -> dict[str, str]:
    """What an error body says, for the log: its `error.type` and `error.message` (already
    scrubbed, cut short); nothing if it is not the API's error shape."""
    try:
        error = json.loads(body)["error"] if isinstance(body, bytes) else None
    except (ValueError, KeyError, TypeError):
        return {}
    if not isinstance(error, dict):
        return {}
    return {key: str(error[name])[:200] for key, name in (("error_type", "type"), ("said", "message")) if name in error}


def _presented(request: web.Request) -> str | None:
    """The capability the CLI presents: its bearer token (or, as an API-key client, its key)."""
    authorization = request.headers.get("authorization", "")
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return request.headers.get("x-api-key") or None


def _to_home(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The CLI's headers for its account's home gateway: its capability kept (that gateway checks
    it), what each side's HTTP layer writes left out."""
    return CIMultiDict((k, v) for k, v in incoming.items() if k.lower() not in SET_BY_THE_RELAY | {"cookie"})


def _outbound(incoming: CIMultiDictProxy[str], account: Account) -> CIMultiDict[str]:
    """The CLI's headers, less its capability and the hop-by-hop ones, with the account's credential."""
    headers = CIMultiDict((k, v) for k, v in incoming.items() if k.lower() not in NOT_FROM_THE_CLI)
    secret = account.secrets[0].reveal()
    if account.kind is CredentialKind.API_KEY:
        headers["x-api-key"] = secret
        if beta := headers.get("anthropic-beta"):
            kept = ",".join(flag for flag in beta.split(",") if flag.strip() != OAUTH_BETA)
            headers.popall("anthropic-beta")
            if kept:
                headers["anthropic-beta"] = kept
    else:
        headers["authorization"] = f"Bearer {secret}"
    return headers


def _wall_until(until: float, message: str) -> web.Response:
    """A refusal the CLI takes as its account's wall until `until`: its turn ends and its worker
    holds it for a move, as for the API's own."""
    response = _error(429, "rate_limit_error", message)
    response.headers.update(
        {
            f"{limits.PREFIX}status": "rejected",
            f"{limits.PREFIX}reset": str(int(until)),
            "retry-after": str(max(1, int(until - time.time()))),
        }
    )
    return response


def _error(status: int, kind: str, message: str) -> web.Response:
    """An error in the API's own shape, so the CLI reports it as it would the API's."""
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")
