"""The balancer's `status` reply, built so that it stays fast at 10,000 accounts.

Each account's JSON object is kept between requests. A new roster version (the registry's own
counter) renders them all again; otherwise a request re-renders only the accounts whose facts
(wall, probation, live sessions, usage, settings) differ from the last request's, and joins.
Sessions and jobs arrive from the store already as JSON.
"""

from __future__ import annotations

import collections
import json
from typing import NamedTuple

from cl.account_state import State, standing
from cl.credentials import Account
from cl.moments import iso_utc
from cl.protocol import Encoded
from cl.registry import CredentialRegistry
from cl.store import AccountSettings, Snapshot, UsageRow, WallRecord, Window


class Shown(NamedTuple):
    """What an account's object shows beyond its file."""

    wall: WallRecord | None
    probation: bool
    sessions: int
    usage: UsageRow | None
    settings: AccountSettings | None
    model_walls: tuple[tuple[str, float | None], ...]
    """Its model windows' walls: (family, reset)."""
    windows: tuple[tuple[str, Window], ...]
    """Its windows as the API last said them (utilization, reset, burn rate)."""


IDLE = Shown(None, False, 0, None, None, (), ())


class Rendered(NamedTuple):
    """One account's object, and what the dashboard orders and counts it by."""

    json: str
    state: State
    five_hour: float
    """Its 5-hour window's utilization as last read (0 if never)."""
    sessions: int


ATTENTION = (State.WALLED, State.NEEDS_LOGIN, State.INVALID, State.PROBATION, State.PAUSED, State.OK)
"""The dashboard's order: the states that need a look first."""


class Board(NamedTuple):
    """The dashboard's view of the accounts: each one's object in `ATTENTION` order (then the
    fullest 5-hour window first, then by name), how many are in each state, live sessions."""

    accounts: list[tuple[str, str]]
    """(name, object) in order."""
    counts: dict[str, int]
    sessions: int


class StatusView:
    def __init__(self, registry: CredentialRegistry) -> None:
        self._registry = registry
        self._idle: dict[str, tuple[Account, Rendered]] = {}
        """Each account's object with no facts, with the account object it was made from (a new
        object, a new rendering): rendered once per change."""
        self._version = -1
        self._index: dict[str, int] = {}
        self._names: list[str] = []
        self._objects: list[Rendered] = []
        self._facts: dict[str, Shown] = {}
        """The facts each account's object in `_objects` shows, for accounts that have any."""
        self._inputs: tuple[int, Snapshot] | None = None
        """The roster version and the snapshot `_objects` was made from: one with the same facts is
        rendered the same."""
        self._board: Board | None = None
        self._last: tuple[tuple[int, str | None, tuple[str, ...]], Snapshot, Encoded] | None = None

    def render(self, snapshot: Snapshot, blocked: str | None = None, ramping: tuple[str, ...] = ()) -> Encoded:
        """The whole reply object; the last one again if neither the roster nor the store changed
        (the store hands out the same listing and counts objects then). `blocked`: what stops
        every CLI from starting (`cl.doctor`), if anything; `ramping`: the accounts the ramp after
        a wall held at the last placement pass (`Placer.ramping`)."""
        last = self._last
        if (
            last is not None
            and last[0] == (self._registry.version, blocked, ramping)
            and last[1].listing is snapshot.listing
            and _same_facts(last[1], snapshot)
        ):
            return last[2]
        listing = snapshot.listing
        accounts = ",".join(rendered.json for rendered in self._accounts(snapshot))
        reply = Encoded(
            f'{{"accounts":[{accounts}],"sessions":{listing.sessions_json},'
            f'"jobs":{listing.jobs_json},"queue":{listing.queue},"hidden":{listing.hidden},'
            f'"blocked":{json.dumps(blocked)},"ramping":{json.dumps(ramping)}}}'.encode()
        )
        self._last = ((self._registry.version, blocked, ramping), snapshot, reply)
        return reply

    def board(self, snapshot: Snapshot) -> Board:
        """The accounts as the dashboard orders them: sorted again only after a change."""
        objects = self._accounts(snapshot)
        if self._board is None:
            order = sorted(
                range(len(objects)),
                key=lambda i: (ATTENTION.index(objects[i].state), -objects[i].five_hour, self._names[i]),
            )
            counts = collections.Counter(str(rendered.state) for rendered in objects)
            sessions = sum(rendered.sessions for rendered in objects)
            self._board = Board([(self._names[i], objects[i].json) for i in order], dict(counts), sessions)
        return self._board

    def _accounts(self, snapshot: Snapshot) -> list[Rendered]:
        inputs = self._inputs
        if inputs is not None and inputs[0] == self._registry.version and _same_facts(inputs[1], snapshot):
            return self._objects
        self._board = None
        roster = self._registry.accounts
        if self._version != self._registry.version:
            self._names = self._registry.sorted_names()
            self._version = self._registry.version
            self._index = {name: i for i, name in enumerate(self._names)}
            self._idle = {name: self._idle_of(roster[name]) for name in self._names}
            self._objects = [self._idle[name][1] for name in self._names]
            self._facts = {}
        walls, live, usage, settings = snapshot.walls, snapshot.counts.live, snapshot.counts.usage, snapshot.settings
        by_model, windows, probation = snapshot.model_walls, snapshot.windows, snapshot.probation
        facts: dict[str, Shown] = {}
        named = walls.keys() | live.keys() | usage.keys() | settings.keys() | by_model.keys() | windows.keys()
        for name in named | probation:
            if name in self._index:  # a fact about an account that left the roster is not shown
                models = tuple(sorted(by_model.get(name, {}).items()))
                spans = tuple(sorted(windows.get(name, {}).items()))
                facts[name] = Shown(
                    walls.get(name),
                    name in probation,
                    live.get(name, 0),
                    usage.get(name),
                    settings.get(name),
                    models,
                    spans,
                )
        for name in self._facts.keys() - facts.keys():  # no facts any more: idle again
            self._objects[self._index[name]] = self._idle[name][1]
        for name, shown in facts.items():
            if self._facts.get(name) != shown:
                self._objects[self._index[name]] = _rendered(roster[name], shown)
        self._facts = facts
        self._inputs = (self._registry.version, snapshot)
        return self._objects

    def _idle_of(self, account: Account) -> tuple[Account, Rendered]:
        kept = self._idle.get(account.name)
        return kept if kept is not None and kept[0] is account else (account, _rendered(account, IDLE))


def _same_facts(before: Snapshot, now: Snapshot) -> bool:
    """The two snapshots show the accounts the same (the store hands out the same counts,
    settings and windows objects while the database is unchanged)."""
    return (
        before.counts is now.counts
        and before.settings is now.settings
        and before.windows is now.windows
        and before.walls == now.walls
        and before.model_walls == now.model_walls
        and before.probation == now.probation
    )


def _rendered(account: Account, shown: Shown) -> Rendered:
    """`{"name", "state", "reason", "window", "walled_until", "sessions", ...}`: the state is the
    account's one state (`cl.account_state`)."""
    now = standing(account, shown.wall, shown.settings, shown.probation)
    fields = {"name": account.name, **now.public(), "sessions": shown.sessions}
    if shown.model_walls:  # a model's window walled: that family waits for its reset, the others go there
        fields["model_walls"] = {m: iso_utc(r) if r else None for m, r in shown.model_walls}
    if shown.usage:
        keys = ("five_hour", "seven_day", "input_tokens", "output_tokens")
        fields["usage"] = {k: v for k, v in zip(keys, shown.usage, strict=True) if v is not None}
    if shown.settings:
        fields["settings"] = shown.settings.public()
    if shown.windows:  # each window as the API last said it: how full, when it resets, how fast it fills
        fields["windows"] = {name: w.public() for name, w in shown.windows}
    five = dict(shown.windows).get("five_hour")
    return Rendered(json.dumps(fields), now.state, five.utilization if five else 0.0, shown.sessions)
