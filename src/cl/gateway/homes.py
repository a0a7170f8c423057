"""The other hosts' accounts, as this host's gateway reaches them: each through its home's gateway.

Where an account lives is asked of the store at each request (`Store.homes`): nothing here keeps
the fleet's roster. What is kept is what this gateway found on trying: the homes it could not
reach. Such a home is cut off from this host in the store for `wall_retry` (`Store.cut_off`), so
that this host's daemons place nothing there meanwhile and move the sessions that were there;
the first request that gets through again ends it (`Store.reached`). Each is said once.
"""

from __future__ import annotations

import ssl
import time

import structlog

from cl import fleet
from cl.config import Config
from cl.store import AsyncStore, Home, StoreUnavailable

log = structlog.get_logger("cl.gateway")

CONNECT_TIMEOUT = 5.0
"""Seconds a connection to another host's gateway may take before that host counts as unreachable."""


class Homes:
    def __init__(self, config: Config, store: AsyncStore, tls: ssl.SSLContext) -> None:
        self._config = config
        self._store = store
        self.tls = tls
        self.answer_timeout = config.fleet_answer_timeout
        """Seconds a home's gateway has to begin its answer (`fleet_answer_timeout`)."""
        self._cut: set[str] = set()
        """The homes this gateway found unreachable, and has not reached since."""

    async def of(self, account: str) -> Home | None:
        """The home of an account this host has no file for, if a live host serves it."""
        homes = await self._store.homes(self._config.host_name, fleet.stale_after(self._config), account)
        return homes.get(account)

    async def unreachable(self, home: Home, account: str, error: str) -> float:
        """`home`'s gateway could not be reached: cut off from this host until the time returned."""
        seconds = self._config.wall_retry
        try:
            await self._store.cut_off(self._config.host_name, home.host, seconds)
        except StoreUnavailable as exc:
            log.warning("cut-off not recorded: state store unavailable", home=home.host, error=str(exc))
        if home.host not in self._cut:
            log.warning(
                "an account's home cannot be reached: no work goes there from this host for now",
                home=home.host,
                account=account,
                gateway=home.gateway,
                seconds=seconds,
                error=error,
            )
            self._cut.add(home.host)
        return time.time() + seconds

    async def reachable(self, home: Home) -> None:
        """A request reached `home`'s gateway: if it had been cut off, no longer."""
        if home.host in self._cut:
            self._cut.discard(home.host)
            await self._store.reached(self._config.host_name, home.host)
            log.info("an account's home is reachable again", home=home.host)
