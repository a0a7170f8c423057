"""`cl-gateway`: the daemon around the proxy, on the lifecycle the other two share (`cl.daemon`).

It derives the roster from the credentials directory through its own `CredentialRegistry`, as
every process does, and reads the tokens from there when a request needs them: nothing holds a
second list. It listens on `gateway_listen` (loopback only) before READY=1, answers `accounts`
and `metrics` on its control socket, refreshes OAuth tokens ahead of expiry, writes usage to the
store in batches, and lifts `needs-login` when a new login lands. It asks cl-rescue, over its
control socket, to move a session whose request met a wall. With `fleet_listen` it also listens
there, over TLS with the fleet's certificates, for the other hosts' requests for its accounts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import structlog
import uvloop
from aiohttp import web

from cl import daemon
from cl.client import DaemonUnreachable, call, tell
from cl.config import Config, ConfigError, load_config
from cl.credentials import CredentialKind
from cl.gateway import tls
from cl.gateway.homes import Homes
from cl.gateway.proxy import MAX_BODY, Proxy, Recorder, WaitUntil
from cl.gateway.refresher import Refresher
from cl.protocol import Handler, Peer, Reply, Request
from cl.registry import CredentialRegistry
from cl.store import AsyncStore, Run, Store, StoreUnavailable

log = structlog.get_logger("cl.gateway")

SUBSCRIBED = (CredentialKind.OAUTH, CredentialKind.OAUTH_TOKEN)
"""The credentials whose accounts have unified windows to read (an API key's have none)."""
MOVE_TIMEOUT = 10.0
"""Seconds a request waits for the rescuer's decision before its 429 goes through."""


class Gateway:
    name = "gateway"

    def __init__(self, config: Config, registry: CredentialRegistry, _status_changed: Callable[[], None]) -> None:
        self.config = config
        self.registry = registry
        store = Store(config.database, config.store_busy_timeout)
        self.store = AsyncStore(store)
        self.lookup = store.lookup()
        self._client: aiohttp.ClientSession | None = None
        self.refresher = Refresher(config, registry, self.store, self.client)
        self.recorder = Recorder(self.store, config.burn_step)
        self.proxy = Proxy(
            upstream=config.gateway_upstream,
            wall_retry=config.wall_retry,
            store=self.store,
            lookup=self.lookup,
            registry=registry,
            refresher=self.refresher,
            recorder=self.recorder,
            move=self._move,
            client=self.client,
            move_at=config.move_at,
        )
        self._runners: list[web.AppRunner] = []
        self._logins: asyncio.Task[None] | None = None
        self._roster_changed = asyncio.Event()

    def client(self) -> aiohttp.ClientSession:
        assert self._client is not None, "the gateway has not started"
        return self._client

    def handlers(self) -> dict[str, Handler]:
        return {"metrics": self._metrics}

    async def start(self) -> None:
        """Listen before READY=1: a CLI started after it finds the gateway there."""
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=900)
        self._client = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        for_the_clis = await self._runner(self.proxy.handle)
        await _tcp_site(for_the_clis, self.config.gateway_listen).start()
        path = self.config.gateway_socket
        path.parent.mkdir(mode=0o711, exist_ok=True)
        path.unlink(missing_ok=True)
        await web.UnixSite(for_the_clis, str(path)).start()
        path.chmod(0o666)  # the CLIs' users connect, in their views; the runtime dir keeps everyone else out
        log.info("listening", address=self.config.gateway_listen, upstream=self.config.gateway_upstream)
        if self.config.reaches_fleet:
            server, client = tls.contexts(self.config)
            self.proxy.homes = Homes(self.config, self.store, client)
            for_the_fleet = await self._runner(self.proxy.handle_for_the_fleet)
            await _tcp_site(for_the_fleet, self.config.fleet_listen, server).start()
            log.info("listening for the fleet", address=self.config.fleet_listen, host=self.config.host_name)

    async def _runner(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.AppRunner:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        return runner

    async def work(self) -> None:
        tasks = [
            asyncio.create_task(self.recorder.run()),
            asyncio.create_task(self._refresh_ahead()),
            asyncio.create_task(self._read_idle_accounts()),
        ]
        self.wake()
        try:
            await asyncio.Event().wait()
        finally:
            for task in tasks:
                task.cancel()
            await self.refresher.finish()
            for runner in self._runners:
                await runner.cleanup()
            if self._client is not None:
                await self._client.close()
            await self.recorder.flush()
            if self.lookup is not None:
                self.lookup.close()
            self.store.close()

    def status(self) -> str:
        counts = self.proxy.counts
        return f"{counts.forwarded} forwarded, {counts.moves} moved in flight, {self.refresher.refreshes} refreshed"

    async def reloaded(self) -> None:
        """Nothing outside the configuration to check again."""

    def wake(self) -> None:
        """The roster changed: a token may be due, a `needs-login` account may have a new login."""
        self._roster_changed.set()
        if self._logins is None or self._logins.done():
            self._logins = asyncio.get_running_loop().create_task(self._lift_logins())

    async def _lift_logins(self) -> None:
        """Lift `needs-login` where a new login landed, and tell the daemons: work may go there."""
        with contextlib.suppress(StoreUnavailable):
            if await self.refresher.lift_logins():
                for name in ("balancer", "rescue"):
                    await asyncio.to_thread(tell, self.config.socket_path(name), {"request": "run-changed", "run": 0})

    async def _refresh_ahead(self) -> None:
        """Every account's token is renewed before it expires, used or not: a sweep when the
        roster changes and when the next token falls due (at least every `SWEEP_INTERVAL`)."""
        while True:
            self._roster_changed.clear()
            try:
                await self.refresher.sweep()
            except StoreUnavailable as exc:
                log.warning("refresh sweep skipped: state store unavailable", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._roster_changed.wait(), self.refresher.next_due())

    async def _read_idle_accounts(self) -> None:
        """Every `probe_interval`, the OAuth accounts of this host whose windows nobody read
        meanwhile (no session used them) are read (`Proxy.probe`): an idle account has a
        utilization too, used by others (claude.ai) or not, and its age shows in `cl accounts`."""
        interval = self.config.probe_interval
        if not interval:
            return
        while True:
            try:
                windows, walls = await self.store.windows(), await self.store.walls()
                read = {name: max((w.read_at or 0.0) for w in by.values()) for name, by in windows.items()}
                for name, account in sorted(self.registry.accounts.items()):
                    idle = read.get(name, 0.0) < time.time() - interval and name not in walls  # a wall: its reset known
                    if idle and account.usable and account.kind in SUBSCRIBED:
                        await self.proxy.probe(account)
            except StoreUnavailable as exc:
                log.debug("idle accounts not read: state store unavailable", error=str(exc))
            await asyncio.sleep(min(interval / 4, 60.0))

    async def _move(self, run: Run, early: str | None, context: int | None) -> Run | WaitUntil | None:
        """The rescuer's decision on a session whose request met a wall, or whose account crossed
        `move_at` in the window `early` (`context`: the session's tokens, for what a move costs
        it): the run it goes on as, or the reset to wait for."""
        request = {"request": "move-now", "run": run.id, **({"early": early} if early else {}),
                   **({"context": context} if context else {})}  # fmt: skip
        try:
            reply = await asyncio.to_thread(call, self.config.socket_path("rescue"), request, MOVE_TIMEOUT)
        except (DaemonUnreachable, ValueError) as exc:
            log.warning("cannot ask the rescuer to move a session", run=run.id, job=run.job_id, error=str(exc))
            return None
        if not reply.get("ok"):
            if reply.get("code") not in ("no-room", "hold"):
                log.warning("the rescuer did not move a session", run=run.id, job=run.job_id, error=reply.get("error"))
            return None
        if "wait_until" in reply:
            return WaitUntil(float(reply["wait_until"]))
        return await self.store.get_run(int(reply["run"]))

    async def _metrics(self, _request: Request, _peer: Peer) -> Reply:
        counts = self.proxy.counts
        return {
            "counters": {
                "requests_forwarded": counts.forwarded,
                "requests_refused_capability": counts.refused["capability"],
                "requests_refused_path": counts.refused["path"],
                "walls_from_api": counts.walls,
                "moves_in_flight": counts.moves,
                "early_moves": counts.early_moves,
                "walls_passed_to_cli": counts.walls_passed,
                "upstream_errors": counts.upstream_errors,
                "token_refreshes": self.refresher.refreshes,
                "token_refresh_failures": self.refresher.failures,
                "token_refreshes_refused": self.refresher.refused,
            },
        }


def _tcp_site(runner: web.AppRunner, address: str, context: ssl.SSLContext | None = None) -> web.TCPSite:
    host, _, port = address.rpartition(":")
    return web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True, ssl_context=context)


def main() -> None:
    try:
        direct = not load_config(keys={"gateway"}).gateway
    except ConfigError:
        direct = False  # daemon.main says what is wrong
    if direct:  # the CLIs hold their accounts' credentials and refresh them: a second refresher races them
        print(
            "cl-gateway: configuration error: gateway = false (direct mode): the CLIs hold and refresh their"
            " accounts' tokens themselves, so cl-gateway must not run; set gateway = true, or stop cl-gateway",
            file=sys.stderr,
        )
        sys.exit(2)
    # uvloop: the event loop is most of a relay's work (bench/gateway.py measures it).
    sys.exit(daemon.main("gateway", Gateway, uvloop.new_event_loop))
