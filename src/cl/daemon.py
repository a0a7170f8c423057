"""The lifecycle both daemons share: start, ready, serve, reload, drain, stop.

start: config -> logging -> first registry load -> socket bound -> READY=1.
serve: the service's own work; STATUS= kept current; WATCHDOG=1 from the event loop.
SIGHUP: RELOADING=1 -> config re-read (a bad one is refused, the old one kept) -> full
resync -> READY=1. SIGTERM/SIGINT: STOPPING=1 -> bounded drain -> exit 0.
Signal handlers only record the signal; the main loop acts on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import structlog

from cl import logs
from cl.config import Config, ConfigError, load_config
from cl.credentials import CANNOT_LOOK
from cl.notify import Notifier, watchdog_interval
from cl.protocol import ControlServer, Encoded, Handler, Peer, Reply, Request, RequestError
from cl.registry import CredentialRegistry
from cl.store import StoreUnavailable, retry_delay

log = structlog.get_logger("cl.daemon")

DRAIN_TIMEOUT = 10.0
CLOCK_CHECK_INTERVAL = 5.0
CLOCK_JUMP = 2.0
"""Seconds the wall clock may drift from the monotonic one between two checks before it counts as a jump."""
_RESTART_KEYS = ("credentials_dir", "state_dir", "sessions_dir", "runtime_dir", "gateway")
"""Kept as they were at start by a reload: a directory moved, or the mode (with the gateway, or without)."""


class Service(Protocol):
    """What one daemon adds to the shared lifecycle."""

    def handlers(self) -> Mapping[str, Handler]:
        """Requests this daemon answers besides the shared ones."""
        ...

    async def start(self) -> None:
        """What must be in place before READY=1 (a listener), after the roster's first load."""
        ...

    async def work(self) -> None:
        """The daemon's own work; cancelled at shutdown."""
        ...

    def status(self) -> str:
        """Its part of the one-line STATUS=, or ''."""
        ...

    def wake(self) -> None:
        """Look at the world again: the roster changed, or the clock jumped (every wall's reset
        moved relative to now), or the next wall reset came (`ResetTimer`)."""
        ...

    async def reloaded(self) -> None:
        """After a reload (SIGHUP): check again what lies outside the configuration (`cl.doctor`)."""
        ...


ServiceFactory = Callable[[Config, CredentialRegistry, Callable[[], None]], Service]
"""Makes the service from the configuration, the registry and a `status_changed` callback."""


class Daemon:
    def __init__(self, name: str, config: Config, factory: ServiceFactory) -> None:
        self.name = name
        self.config = config
        self.registry = CredentialRegistry(
            config.credentials_dir, resync_interval=config.resync_interval, step_ms=config.watch_step_ms
        )
        self._factory = factory
        self._notifier = Notifier()
        self._events: asyncio.Queue[signal.Signals | None] = asyncio.Queue()
        """Signals received, and None when the service failed."""
        self._status_dirty = asyncio.Event()
        self._roster_reply: tuple[tuple[int, tuple[tuple[str, str], ...]], Encoded] | None = None
        """The whole roster's `accounts` reply, and the roster version and misnamed files it shows."""

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_loop_trouble)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, self._events.put_nowait, signum)
        log.info("starting", credentials_dir=str(self.config.credentials_dir))
        if self.name != "gateway" and self.config.confinement == "none":  # the daemons that launch CLIs
            log.warning("confinement = none: every job's CLI runs unconfined, as the worker's own user")
        await self.registry.start()
        try:
            self.service = self._factory(self.config, self.registry, self._status_dirty.set)
        except StoreUnavailable as exc:  # a server away at start: said, and systemd starts us again
            log.error("cannot open the state store", error=str(exc))
            await self.registry.stop()
            return 1
        handlers = {"accounts": self._accounts, **{k: _store_guarded(h) for k, h in self.service.handlers().items()}}
        server = ControlServer(self.config.socket_path(self.name), handlers)
        try:
            await server.start()
            await self.service.start()
        except OSError as exc:  # a listener's address, or the fleet's TLS files
            log.error("cannot listen", socket=str(server.path), error=str(exc))
            await server.close()
            await self.registry.stop()
            return 1
        service_task = asyncio.create_task(self.service.work(), name=f"{self.name}-service")
        service_task.add_done_callback(self._on_service_done)
        tasks = [
            service_task,
            asyncio.create_task(self._follow_roster(), name="roster"),
            asyncio.create_task(self._keep_status(), name="status"),
            asyncio.create_task(self._watch_clock(), name="clock"),
        ]
        if (interval := watchdog_interval()) is not None:
            tasks.append(asyncio.create_task(self._keep_watchdog(interval), name="watchdog"))
        self._notifier.ready(self.status())
        log.info("ready", socket=str(server.path), status=self.status())

        while (event := await self._events.get()) is signal.SIGHUP:
            await self._reload()
        if event is not None:
            log.info("signal received", signal=event.name)

        self._notifier.stopping()
        log.info("stopping")
        await server.close()
        await _cancel(tasks, DRAIN_TIMEOUT)
        await self.registry.stop()
        log.info("stopped")
        return 0 if event is not None else 1

    def status(self) -> str:
        own = self.service.status()
        count = len(self.registry.accounts)
        roster = f"{count} account{'' if count == 1 else 's'}, {self.registry.usable_count} usable"
        return roster + (f", {own}" if own else "")

    def _on_service_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("service failed", error=repr(exc))
            self._events.put_nowait(None)

    async def _reload(self) -> None:
        self._notifier.reloading()
        log.info("reloading")
        try:
            new = load_config()
        except ConfigError as exc:
            log.error("reload refused: bad configuration, keeping the running one", error=str(exc))
        else:
            for key in _RESTART_KEYS:
                if getattr(new, key) != getattr(self.config, key):
                    log.warning("setting needs a restart to take effect", key=key, value=str(getattr(new, key)))
            self.config = dataclasses.replace(new, **{key: getattr(self.config, key) for key in _RESTART_KEYS})
            logs.configure_for(self.config, self.name)
            self.registry.reconfigure(resync_interval=self.config.resync_interval, step_ms=self.config.watch_step_ms)
        await self.registry.resync()
        await self.service.reloaded()
        self._notifier.ready(self.status())
        log.info("reloaded", status=self.status())

    async def _follow_roster(self) -> None:
        """On every roster change (a burst is one): STATUS= anew, and the service looks again."""
        subscription = self.registry.subscribe()
        try:
            async for _ in subscription:
                subscription.drain()
                self._status_dirty.set()
                self.service.wake()
        finally:
            subscription.close()

    async def _keep_status(self) -> None:
        """One STATUS= per burst of changes (roster or service), not one per change."""
        while True:
            await self._status_dirty.wait()
            self._status_dirty.clear()
            self._notifier.status(self.status())

    async def _watch_clock(self) -> None:
        """Walls reset by the wall clock, timers run on the monotonic one: when the wall clock jumps
        (an NTP step, a manual `date -s`), say so and look at everything again."""
        offset = time.time() - time.monotonic()
        while True:
            await asyncio.sleep(CLOCK_CHECK_INTERVAL)
            now = time.time() - time.monotonic()
            if abs(now - offset) > CLOCK_JUMP:
                log.warning("system clock jumped", seconds=round(now - offset, 1))
                self.service.wake()
                await self.registry.resync()  # `expired` is by the wall clock too
            offset = now

    async def _keep_watchdog(self, interval: float) -> None:
        while True:
            self._notifier.watchdog()
            await asyncio.sleep(interval)

    async def _accounts(self, request: Request, _peer: Peer) -> Reply | Encoded:
        """The live roster with states, and the misnamed files it ignores; `names` (a list) narrows
        it to those accounts. The whole roster's reply is kept until the roster's next version
        (10,000 accounts are 1.5 MB)."""
        roster = self.registry.accounts
        names = request.get("names")
        if names is None:
            misnamed = self.registry.misnamed
            key = (self.registry.version, tuple(misnamed.items()))
            if self._roster_reply is None or self._roster_reply[0] != key:
                accounts = [roster[name].public() for name in self.registry.sorted_names()]
                ignored = [{"file": file, "rename_to": better} for file, better in misnamed.items()]
                encoded = Encoded(json.dumps({"daemon": self.name, "accounts": accounts, "ignored": ignored}).encode())
                self._roster_reply = (key, encoded)
            return self._roster_reply[1]
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise RequestError("bad-request", '"names" must be a list of account names')
        return {"daemon": self.name, "accounts": [roster[name].public() for name in names if name in roster]}


def _loop_trouble(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """What asyncio itself reports, as one log line: out of descriptors it stops accepting
    connections for a second (and says so on every try), which an operator must see."""
    exception = context.get("exception")
    if isinstance(exception, OSError) and exception.errno in CANNOT_LOOK:
        log.error("cannot accept connections now, trying again in a second", error=os.strerror(exception.errno or 0))
    elif not (isinstance(exception, ValueError) and "Invalid file descriptor" in str(exception)):  # a closed server
        log.error("event loop error", message=context.get("message"), error=repr(exception) if exception else None)


def _store_guarded(handler: Handler) -> Handler:
    """A request that finds the store unavailable gets that answer (`unavailable`), not `internal`."""

    async def guarded(request: Request, peer: Peer) -> Reply | Encoded:
        try:
            return await handler(request, peer)
        except StoreUnavailable as exc:
            log.warning("request refused: state store unavailable", request=request.get("request"), error=str(exc))
            raise RequestError("unavailable", f"{exc}; try again") from exc

    return guarded


class ResetTimer:
    """The one timer a service keeps: wake it at the next wall reset (waiting costs only this)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._handle: asyncio.TimerHandle | None = None

    def set(self, at: float | None, jitter: float) -> None:
        """Wake at `at` (epoch seconds) plus `jitter`, instead of any earlier setting; None: never."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if at is not None:
            delay = max(0.0, at - time.time()) + jitter
            self._handle = asyncio.get_running_loop().call_later(delay, self._wake)


async def serve_passes(wake: asyncio.Event, one_pass: Callable[[], Awaitable[None]]) -> None:
    """Run `one_pass` each time `wake` is set. A store that is unavailable (locked past its busy
    timeout, disk full) is said once per outage and retried with backoff: no work is lost meanwhile,
    because the work is in the store."""
    delay = 0.0
    while True:
        await wake.wait()
        wake.clear()
        try:
            await one_pass()
        except StoreUnavailable as exc:
            if not delay:
                log.error("state store unavailable, retrying", error=str(exc))
            delay = retry_delay(delay)
            await asyncio.sleep(delay)
            wake.set()
            continue
        if delay:
            log.info("state store available again")
            delay = 0.0


async def _cancel(tasks: list[asyncio.Task[None]], timeout: float) -> None:
    for task in tasks:
        task.cancel()
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    if pending:
        log.warning("tasks did not stop in time", tasks=[task.get_name() for task in pending])


def main(
    name: str, factory: ServiceFactory, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
) -> int:
    """A daemon's `main`: exit 2 on bad configuration, 1 on failure, 0 on a clean stop."""
    if (config := logs.start_process(name)) is None:
        return 2
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(Daemon(name, config, factory).serve())
