"""Which account takes the next piece of work: one implementation, for placement and rescue.

Eligible: usable now (its file here is `ok`, or another live host of the fleet publishes it so:
`Service.usable`), not paused, not past its own `pause_at` (the fuller of its standing
windows), no standing wall, fewer live runs than its limit (its own `max_sessions` setting,
else `max_sessions_per_account`; one while on probation: its wall has reset but it has not
answered since, so a still-walled account cannot swallow the whole queue; no probation after a
5-hour or 7-day wall whose reset the API named; with the ramp, at most what its 5-hour window
sustains, in the first period after a wall: `Placer`), allowed to serve the job's model, and no
standing wall of that model's window (`seven_day_opus`, `seven_day_sonnet`: any of them, for a
job that names no model, since the CLI's default may be one). Then, by policy:
* `headroom`: the lowest reported utilization (the larger of the 5-hour and 7-day windows), then
  the fewest live runs, then the least recently used, then the name;
* `fill-first`: the account with the most live runs that still has room, then the name;
* `round-robin`: the account least recently given work (or used), then the name;
* `pace`: the budget that is lost first, used first. Of the accounts with room now (the 5-hour
  window projected to stay under `move_at` at its reset with one more session, `cl.pacing`; the
  7-day window under it now), the one with the most of its 7-day window left per hour to its
  reset (what it does not use by then is lost: mostly the week that resets soonest, which gives
  way to the next as it is used, so that the weeks are used alongside each other and no one
  account is left to carry the fleet alone before a reset); if none has, the lowest projection
  (the fuller window at its reset). Each placement counts at once, so a herd of sessions (those
  of an account that just walled) spreads over the accounts instead of filling the emptiest. (A
  7-day window's projection over days is rarely under 1 for a busy fleet: it orders, it does not
  exclude.) Where the windows say nothing apart (none read: direct mode, or a fresh fleet),
  `headroom`'s order. The default.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping

from cl.config import MOVE_AT, Config
from cl.pacing import Outlook
from cl.store import UNSET, AccountSettings, Facts, NoRoom, model_walled


def eligible(
    usable: Iterable[str],
    walled: Collection[str],
    live: Mapping[str, int],
    max_sessions: int,
    *,
    probation: Collection[str] = (),
    settings: Mapping[str, AccountSettings] | None = None,
    aside: Collection[str] = (),
    used: Mapping[str, float] | None = None,
) -> list[str]:
    """Of the `usable` accounts, those that may take a piece of work now, whatever its model
    (`aside`: another host of the fleet serves them; `used`: the fuller of each account's standing
    windows, for its `pause_at`)."""
    settings = settings or {}
    used = used or {}
    return [
        name
        for name in usable
        if name not in aside
        and name not in walled
        and (own := settings.get(name, UNSET)).paused_at is None
        and (own.pause_at is None or used.get(name, 0.0) < own.pause_at)
        and live.get(name, 0) < limit(name, max_sessions, probation, settings)
    ]


def limit(
    account: str,
    max_sessions: int,
    probation: Collection[str],
    settings: Mapping[str, AccountSettings] | None = None,
    ramp: Mapping[str, int] | None = None,
) -> int:
    """How many live runs `account` may have now (`ramp`: at most this many, for an account the
    ramp after a wall holds to what its 5-hour window sustains)."""
    if account in probation:
        return 1
    own = (settings or {}).get(account, UNSET).max_sessions
    most = max_sessions if own is None else own
    return min(most, ramp[account]) if ramp and account in ramp else most


def serving(
    candidates: list[str],
    model: str | None,
    settings: Mapping[str, AccountSettings],
    model_walls: Mapping[str, Mapping[str, float | None]] | None = None,
) -> list[str]:
    """Those of `candidates` that may serve `model`: allowed to, and not walled for it."""
    model_walls = model_walls or {}
    return [
        name
        for name in candidates
        if settings.get(name, UNSET).serves(model) and not model_walled(model_walls.get(name, {}), model)
    ]


def choose(
    candidates: list[str],
    live: Mapping[str, int],
    usage: Mapping[str, Mapping[str, float | None]],
    policy: str,
    *,
    outlook: Outlook | None = None,
    move_at: float = MOVE_AT,
) -> str | None:
    """The policy's choice of `candidates` (`outlook`: the windows' projections, for `pace`)."""
    if not candidates:
        return None
    if policy == "fill-first":
        return min(candidates, key=lambda name: (-live.get(name, 0), name))
    if policy == "round-robin":
        return min(candidates, key=lambda name: (usage.get(name, {}).get("last_used_at") or 0.0, name))
    if policy == "pace":
        return min(candidates, key=functools.partial(pace, outlook or Outlook({}, live), live, usage, move_at))
    return min(candidates, key=functools.partial(headroom, live, usage))


def headroom(
    live: Mapping[str, int], usage: Mapping[str, Mapping[str, float | None]], name: str
) -> tuple[float, int, float, str]:
    """`headroom`'s order: the lowest reported utilization, the fewest live runs, the least
    recently used, the name."""
    facts = usage.get(name, {})
    utilization = max(facts.get("five_hour") or 0.0, facts.get("seven_day") or 0.0)
    return (utilization, live.get(name, 0), facts.get("last_used_at") or 0.0, name)


def pace(
    outlook: Outlook,
    live: Mapping[str, int],
    usage: Mapping[str, Mapping[str, float | None]],
    move_at: float,
    name: str,
) -> tuple[bool, float, float, tuple[float, int, float, str]]:
    """`pace`'s order: the budget that is lost first, used first. Of the accounts with room now (the
    5-hour window projected under `move_at` at its reset with one more session, the 7-day one
    under it now), the one with the most of its 7-day window left per hour to its reset; then the
    lowest projection; then, as where no window was read (direct mode), `headroom`'s order."""
    sessions = live.get(name, 0) + 1
    week = outlook.standing(name, "seven_day")
    fits = outlook.projected_in(name, "five_hour", sessions) < move_at and (week is None or week.utilization < move_at)
    return (
        not fits,
        -outlook.weekly_left_per_hour(name) if fits else 0.0,
        outlook.projected(name, sessions),
        headroom(live, usage, name),
    )


def at_once(config: Config, held: int = 0) -> int | None:
    """How many runs may be live at once in all when sandboxed: one per user of the CLI's pool,
    less the `held` sessions' (a held CLI keeps its user; a live move to it needs no other)."""
    return max(0, config.cli_pool_size - held) if config.confinement == "sandbox" else None


class Placer:
    """One pass's placements over the accounts eligible now (of the `usable` ones passed in): each
    piece of work goes to the policy's choice among those that may serve its model; an account
    found walled, paused or full inside its own transaction (`NoRoom`: the other daemon or an
    operator got there first) is dropped and the next one tried."""

    def __init__(
        self,
        usable: Iterable[str],
        facts: Facts,
        max_sessions: int,
        policy: str,
        *,
        at_once: int | None = None,
        move_at: float = MOVE_AT,
        ramp: bool = False,
    ) -> None:
        """`at_once`: live runs in all, at most (each takes one of the CLI's users); `ramp`: an
        account whose 5-hour window is its first since a wall takes only as many live runs as that
        window sustains to its reset (`Outlook.sustains`), so a herd of waiting work cannot use it
        up at once."""
        self._at_once = at_once
        self._outlook = Outlook(facts.windows, dict(facts.live))
        self._move_at = move_at
        self._live = facts.live
        self._usage = dict(facts.usage)  # an account given work gets an entry of its own (round-robin)
        self._probation = facts.probation
        self._settings = facts.settings
        self._model_walls = facts.model_walls
        self._max_sessions = max_sessions
        self._policy = policy
        usable = list(usable)
        self._ramp = (
            {name: self._outlook.sustains(name) for name in usable if self._outlook.after_wall(name)} if ramp else {}
        )
        self._open = eligible(
            usable,
            facts.walls,
            facts.live,
            max_sessions,
            probation=facts.probation,
            settings=facts.settings,
            aside=facts.aside,
            used={name: self._outlook.used(name) for name in facts.settings},
        )
        """The accounts that may take work now but for the ramp."""
        self._candidates = [name for name in self._open if facts.live.get(name, 0) < self._limit(name)]

    @property
    def ramping(self) -> tuple[str, ...]:
        """The accounts that would take more work now but for the ramp after a wall."""
        held = []
        for name in self._open:
            live = self._live.get(name, 0)
            if self._limit(name) <= live < limit(name, self._max_sessions, self._probation, self._settings):
                held.append(name)
        return tuple(sorted(held))

    @property
    def at_most(self) -> int | None:
        """Live runs in all this pass may reach (`at_once`), if bounded."""
        return self._at_once

    @property
    def full(self) -> bool:
        """Every user of the CLI's pool is taken (`at_once`)."""
        return self._at_once is not None and sum(self._live.values()) >= self._at_once

    @property
    def exhausted(self) -> bool:
        """No account may take anything more in this pass."""
        return not self._candidates or self.full

    def assign(self, model: str | None = None) -> tuple[str, int] | None:
        """The account the next piece of work goes to, counted as taken there, and its limit; None
        when no account may take it now (it waits). Its write may still find no room (`refused`)
        or the work gone (`returned`)."""
        if self.exhausted:
            return None
        candidates = serving(self._candidates, model, self._settings, self._model_walls)
        account = choose(
            candidates, self._live, self._usage, self._policy, outlook=self._outlook, move_at=self._move_at
        )
        if account is None:
            return None
        room = self._limit(account)
        self._live[account] = self._live.get(account, 0) + 1
        self._usage[account] = {**self._usage.get(account, {}), "last_used_at": time.time()}  # its turn is over
        if self._live[account] >= room:
            self._drop(account)
        return account, room

    def refused(self, account: str) -> None:
        """An account `assign` gave was walled, paused or full inside its own transaction (the
        other daemon, another host or an operator got there first): nothing more goes there."""
        self.returned(account)
        self._drop(account)
        self._open = [name for name in self._open if name != account]  # walled or paused: not held by the ramp

    def returned(self, account: str) -> None:
        """What `assign` counted on `account` was not placed (the work was gone meanwhile)."""
        self._live[account] -= 1

    async def take(self, attempt: Callable[[str, int], Awaitable[bool]], model: str | None = None) -> bool:
        """Offer one piece of work: `attempt(account, limit)` writes it there (True) or finds the
        work gone meanwhile (False). False only when no account may take it now: it waits."""
        while (choice := self.assign(model)) is not None:
            account, room = choice
            try:
                taken = await attempt(account, room)
            except NoRoom:
                self.refused(account)
                continue
            if not taken:
                self.returned(account)
            return True
        return False

    def _limit(self, account: str) -> int:
        return limit(account, self._max_sessions, self._probation, self._settings, self._ramp)

    def _drop(self, account: str) -> None:
        if account in self._candidates:
            self._candidates.remove(account)
