"""The fleet: several hosts sharing one PostgreSQL store, each with its own roster.

A host's roster is its own credentials directory, as its `CredentialRegistry` sees it; no host
remembers another's. Each host's balancer publishes what its registry holds now (names, states
and a fingerprint of each credential, never a secret) with a heartbeat on the database's clock,
at start, on every roster change and every `heartbeat_interval` (`Publisher`). The fleet is the
union of the rosters of the hosts that are live: a host `MISSED` heartbeats late drops out, and
its accounts with it. One host on SQLite is a fleet of one.

The same credential on two live hosts (the same fingerprint: a file copied, before either host
renewed it) is reported once, loudly, in each host's log and in `cl hosts`. Only the host with
the lower name serves it: the other places no work there (`Facts.aside`) and its gateway
leaves the refresh to it, each asking the store (`Store.served_below`) about its own files as
they are at that moment, never about its own published roster; so the account never has two
refreshers. Two hosts starting at the same
instant with a fresh copy can each refresh once before either has published: the window is
the first heartbeat. One account name that two hosts use for different credentials is said the
same way (`clashes`): walls, usage and settings are kept by name, so the two would share them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

import structlog

from cl.config import Config
from cl.credentials import Account, fingerprint_of, refresh_token
from cl.registry import CredentialRegistry
from cl.store import AsyncStore, HostRecord, Published, StoreUnavailable

log = structlog.get_logger("cl.fleet")

MISSED = 3
"""Heartbeats a host may miss before it drops out of the fleet."""


def stale_after(config: Config) -> float:
    """Seconds after its last heartbeat that a host is out of the fleet."""
    return MISSED * config.heartbeat_interval


def fingerprint(account: Account) -> str | None:
    """What names the credential an account's file holds, without holding it: its refresh token's
    fingerprint (which renewing the access token leaves alone), else its token's or key's."""
    secret = refresh_token(account) or (account.secrets[0].reveal() if account.secrets else None)
    return fingerprint_of(secret) if secret else None


def published(registry: CredentialRegistry) -> list[Published]:
    """This host's roster, as its registry has it now."""
    accounts = registry.accounts
    return [Published(name, str(accounts[name].state), fingerprint(accounts[name])) for name in registry.sorted_names()]


def live(hosts: Iterable[HostRecord], interval: float) -> list[HostRecord]:
    return [host for host in hosts if host.heartbeat_age <= MISSED * interval]


def duplicates(hosts: Iterable[HostRecord]) -> list[list[tuple[str, str]]]:
    """Each credential held by more than one host, as (host, account) pairs in host order."""
    holders: dict[str, list[tuple[str, str]]] = {}
    for host in hosts:
        for account in host.accounts:
            if account.fingerprint is not None:
                holders.setdefault(account.fingerprint, []).append((host.name, account.account))
    return sorted(sorted(pairs) for pairs in holders.values() if len({host for host, _ in pairs}) > 1)


def clashes(hosts: Iterable[HostRecord]) -> list[tuple[str, list[str]]]:
    """Each account name that more than one host uses for different credentials, with those hosts:
    walls, usage and settings are kept by name, so those accounts would share them."""
    holders: dict[str, dict[str, str | None]] = {}
    for host in hosts:
        for account in host.accounts:
            holders.setdefault(account.account, {})[host.name] = account.fingerprint
    return [
        (name, sorted(held))
        for name, held in sorted(holders.items())
        if len(held) > 1 and (None in held.values() or len(set(held.values())) > 1)
    ]


def view(hosts: list[HostRecord], interval: float, here: str) -> dict[str, Any]:
    """The `hosts` reply: every host that published, live or dropped out, its accounts, and the
    credentials held twice (the first holder, by host name, serves it)."""
    alive = {host.name for host in live(hosts, interval)}
    return {
        "host": here,
        "heartbeat_interval": interval,
        "missed": MISSED,
        "hosts": [
            {
                "name": host.name,
                "heartbeat_age": round(host.heartbeat_age, 3),
                "live": host.name in alive,
                "accounts": [{"name": a.account, "state": a.state} for a in host.accounts],
            }
            for host in hosts
        ],
        "duplicates": [
            {"held_by": [{"host": h, "account": a} for h, a in pairs], "served_by": pairs[0][0]}
            for pairs in duplicates(host for host in hosts if host.name in alive)
        ],
        "clashes": [
            {"account": name, "hosts": names} for name, names in clashes(host for host in hosts if host.name in alive)
        ],
    }


class Publisher:
    """This host's heartbeat and roster in the store, kept current by its balancer."""

    def __init__(self, config: Config, registry: CredentialRegistry, store: AsyncStore) -> None:
        self._host = config.host_name
        self._gateway = config.fleet_listen or None
        self._interval = config.heartbeat_interval
        self._registry = registry
        self._store = store
        self._duplicates: list[list[tuple[str, str]]] = []
        self._clashes: list[tuple[str, list[str]]] = []
        """What was last reported: each is said once, when it appears."""
        self._missing = False
        """The last heartbeat did not reach the store."""
        self._shared = bool(config.store)
        """Other hosts may publish too (a PostgreSQL store): their rosters are read for clashes."""
        self._roster: tuple[int, list[Published]] = (-1, [])
        """The roster as last published, with its registry version: made again only when it changes."""

    async def run(self) -> None:
        changes = self._registry.subscribe()
        try:
            while True:
                await self.publish()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(anext(changes), self._interval)
                changes.drain()
        finally:
            changes.close()

    async def publish(self) -> None:
        if self._roster[0] != self._registry.version:  # (10,000 fingerprints at every heartbeat, otherwise)
            self._roster = (self._registry.version, published(self._registry))
        roster = self._roster[1]
        try:
            if await self._store.publish(self._host, roster, self._gateway):
                log.info("host roster published", host=self._host, accounts=len(roster))
            hosts = await self._store.hosts() if self._shared else []  # one host: no other roster to clash with
        except StoreUnavailable as exc:
            if not self._missing:  # said once per outage: the store's own reports say the rest
                log.warning("heartbeats missed: state store unavailable", host=self._host, error=str(exc))
            self._missing = True
            return
        if self._missing:
            log.info("heartbeats again", host=self._host)
        self._missing = False
        fleet = live(hosts, self._interval)
        found, named = duplicates(fleet), clashes(fleet)
        for pairs in (pairs for pairs in found if pairs not in self._duplicates):
            log.error(
                "one credential on several hosts: only the first serves it",
                held_by=", ".join(f"{account} on {host}" for host, account in pairs),
                served_by=pairs[0][0],
                account=pairs[0][1],
            )
        for name, names in (clash for clash in named if clash not in self._clashes):
            log.error(
                "one account name on several hosts for different credentials: they share walls, usage and settings",
                account=name,
                hosts=",".join(names),
            )
        self._duplicates, self._clashes = found, named
