"""The balancer's `status` reply, built so that it stays fast at 10,000 accounts.

Each account's JSON object is kept between requests. A new roster version (the registry's own
counter) renders them all again; otherwise a request re-renders only the accounts whose facts
(wall, live sessions, usage) differ from the last request's, and joins. Sessions and jobs
arrive from the store already as JSON.
"""

from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple

from cl.credentials import Account, AccountState
from cl.moments import iso_utc
from cl.protocol import Encoded
from cl.registry import CredentialRegistry
from cl.store import NEEDS_LOGIN, AccountSettings, Snapshot, UsageRow, Window

_IDLE_TAIL = ',"walled_until":null,"sessions":0}'


class Shown(NamedTuple):
    """What an account's object shows beyond the registry's part."""

    reset_at: float | None
    """Its wall's reset, if walled."""
    sessions: int
    usage: UsageRow | None
    settings: AccountSettings | None
    model_walls: tuple[tuple[str, float | None], ...]
    """Its model windows' walls: (family, reset)."""
    windows: tuple[tuple[str, Window], ...]
    """Its windows as the API last said them (utilization, reset, burn rate)."""
    needs_login: bool
    """Its refresh token was refused."""


NEEDS_LOGIN_REASON = "its refresh token was refused: log in and copy the new credentials over its file"


class StatusView:
    def __init__(self, registry: CredentialRegistry) -> None:
        self._registry = registry
        self._heads: dict[str, tuple[Account, str]] = {}
        """Each account's `{"name", "state"[, "reason"]` JSON without its closing brace, with the
        account object it was made from (a new object, a new head): rendered once per change."""
        self._version = -1
        self._index: dict[str, int] = {}
        self._objects: list[str] = []
        self._facts: dict[str, Shown] = {}
        """The facts each account's object in `_objects` shows, for accounts that have any."""
        self._last: tuple[int, Snapshot, Encoded] | None = None

    def render(self, snapshot: Snapshot) -> Encoded:
        """The whole reply object; the last one again if neither the roster nor the store changed
        (the store hands out the same listing and counts objects then)."""
        last = self._last
        if (
            last is not None
            and last[0] == self._registry.version
            and last[1].listing is snapshot.listing
            and last[1].counts is snapshot.counts
            and last[1].walls == snapshot.walls
            and last[1].model_walls == snapshot.model_walls
            and last[1].settings is snapshot.settings
        ):
            return last[2]
        listing = snapshot.listing
        reply = Encoded(
            f'{{"accounts":[{",".join(self._accounts(snapshot))}],"sessions":{listing.sessions_json},'
            f'"jobs":{listing.jobs_json},"queue":{listing.queue}}}'.encode()
        )
        self._last = (self._registry.version, snapshot, reply)
        return reply

    def _accounts(self, snapshot: Snapshot) -> list[str]:
        roster = self._registry.accounts
        if self._version != self._registry.version:
            names = self._registry.sorted_names()
            self._version = self._registry.version
            self._index = {name: i for i, name in enumerate(names)}
            self._heads = {name: self._head_of(roster[name]) for name in names}
            self._objects = [self._heads[name][1] + _IDLE_TAIL for name in names]
            self._facts = {}
        walls, live, usage, settings = snapshot.walls, snapshot.counts.live, snapshot.counts.usage, snapshot.settings
        by_model, windows = snapshot.model_walls, snapshot.windows
        facts: dict[str, Shown] = {}
        for name in walls.keys() | live.keys() | usage.keys() | settings.keys() | by_model.keys() | windows.keys():
            if name in self._index:  # a fact about an account that left the roster is not shown
                wall = walls.get(name)
                login = wall is not None and wall.kind == NEEDS_LOGIN
                reset = wall.reset_at if wall else None
                models = tuple(sorted(by_model.get(name, {}).items()))
                spans = tuple(sorted(windows.get(name, {}).items()))
                facts[name] = Shown(reset, live.get(name, 0), usage.get(name), settings.get(name), models, spans, login)
        for name in self._facts.keys() - facts.keys():  # no facts any more: idle again
            self._objects[self._index[name]] = self._heads[name][1] + _IDLE_TAIL
        for name, shown in facts.items():
            if self._facts.get(name) != shown:
                head = self._heads[name][1]
                if shown.needs_login and roster[name].usable:
                    head = _head(
                        dataclasses.replace(roster[name], state=AccountState.NEEDS_LOGIN, reason=NEEDS_LOGIN_REASON)
                    )
                self._objects[self._index[name]] = _object(head, shown)
        self._facts = facts
        return self._objects

    def _head_of(self, account: Account) -> tuple[Account, str]:
        kept = self._heads.get(account.name)
        return kept if kept is not None and kept[0] is account else (account, _head(account))


def _head(account: Account) -> str:
    fields = {"name": account.name, "state": str(account.state)}  # (a state, or NEEDS_LOGIN)
    if account.reason:
        fields["reason"] = account.reason
    return json.dumps(fields)[:-1]


def _object(head: str, shown: Shown) -> str:
    until = json.dumps(iso_utc(shown.reset_at)) if shown.reset_at else "null"
    tail = ""
    if shown.model_walls:  # a model's window walled: that family waits for its reset, the others go there
        tail += f',"model_walls":{json.dumps({m: iso_utc(r) if r else None for m, r in shown.model_walls})}'
    if shown.usage:
        keys = ("five_hour", "seven_day", "input_tokens", "output_tokens")
        tail += f',"usage":{json.dumps({k: v for k, v in zip(keys, shown.usage, strict=True) if v is not None})}'
    if shown.settings:
        tail += f',"settings":{json.dumps(shown.settings.public())}'
    if shown.windows:  # each window as the API last said it: how full, when it resets, how fast it fills
        windows = {name: w.public() for name, w in shown.windows}
        tail += f',"windows":{json.dumps(windows)}'
    return f'{head},"walled_until":{until},"sessions":{shown.sessions}{tail}}}'
