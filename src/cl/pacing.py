"""Where each account's windows are headed: the utilization each will have at its reset, projected
from the burn rate of the sessions on it (the `pace` placement, and early moves).

A window is standing while its reset is ahead; one whose reset has passed (or that was never read)
starts empty. Its projection at the reset is its utilization now plus the burn rate of the sessions
on it times the hours left: the account's own measured rate per session (each measure shared among
the sessions live on it when it was taken, so that one measured with four sessions is not charged to
the one left after three moved away), or, where it has none measured, the fleet's (the mean of the
accounts' own). A window that starts empty is given the longest time left that any account's window
of that period has now: the period's length, as far as the fleet knows it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from cl.gateway.limits import WINDOWS
from cl.moments import span
from cl.store import MOVED_EARLY
from cl.windows import Window, first_since_wall

PERIODS = {window: short for short, window in WINDOWS.items()}
"""The windows that wall a whole account, and how they are written for an operator (`5h`, `7d`)."""


class Outlook:
    """The fleet's windows, read once for a pass, and what they are headed for."""

    def __init__(
        self, windows: Mapping[str, Mapping[str, Window]], live: Mapping[str, int], now: float | None = None
    ) -> None:
        self.now = time.time() if now is None else now
        self._windows = windows
        self._live = live
        self._per_session: dict[str, float] = {}
        self._longest: dict[str, float] = {}
        for period in PERIODS:
            rates = [rate for name in windows if (rate := self._own_rate(name, period)) is not None]
            self._per_session[period] = sum(rates) / len(rates) if rates else 0.0
            self._longest[period] = max((self.seconds_left(name, period) for name in windows), default=0.0)

    def standing(self, account: str, period: str) -> Window | None:
        """The window as last read, while its reset is ahead (after it, the window is empty)."""
        window = self._windows.get(account, {}).get(period)
        return window if window is not None and window.standing(self.now) else None

    def seconds_left(self, account: str, period: str) -> float:
        """Until the window resets (0: it is not standing)."""
        window = self.standing(account, period)
        return (window.reset_at or self.now) - self.now if window is not None else 0.0

    def used(self, account: str) -> float:
        """The fuller of the account's standing windows (0: none standing)."""
        return max((w.utilization for p in PERIODS if (w := self.standing(account, p)) is not None), default=0.0)

    def rate(self, account: str, period: str) -> float:
        """Utilization per hour one more session on `account` would add in `period`."""
        own = self._own_rate(account, period)
        return own if own is not None else self._per_session[period]

    def _own_rate(self, account: str, period: str) -> float | None:
        """The account's own per-session rate, as measured (`Window.per_session`), or, for a reading
        that has none, its rate shared among its live sessions; None if neither is known."""
        window = self._windows.get(account, {}).get(period)
        if window is None:
            return None
        if window.per_session is not None:
            return window.per_session
        live = self._live.get(account, 0)
        return window.per_hour / live if window.per_hour is not None and live > 0 else None

    def projected(self, account: str, sessions: int) -> float:
        """The fuller window's utilization at its reset, with `sessions` sessions on the account."""
        return max(self.projected_in(account, period, sessions) for period in PERIODS)

    def projected_in(self, account: str, period: str, sessions: int) -> float:
        used, hours = self._ahead(account, period)
        return used + self.rate(account, period) * sessions * hours

    def after_wall(self, account: str) -> bool:
        """Whether the account's 5-hour window is its first since a wall (`first_since_wall`)."""
        return first_since_wall(self._windows.get(account, {}), self.now)

    def sustains(self, account: str) -> int:
        """How many sessions the account's 5-hour window sustains to its reset at one session's
        burn rate there (`rate`): at least one, and only one while no rate is known."""
        used, hours = self._ahead(account, "five_hour")
        per_session = self.rate(account, "five_hour") * hours
        return max(1, math.floor((1.0 - used) / per_session)) if per_session > 0 else 1

    def _ahead(self, account: str, period: str) -> tuple[float, float]:
        """The window's utilization now and the hours to its reset (a window that starts empty: 0
        and the period's length, as far as the fleet knows it)."""
        window = self.standing(account, period)
        if window is None:
            return 0.0, self._longest[period] / 3600
        return window.utilization, self.seconds_left(account, period) / 3600

    def weekly_left_per_hour(self, account: str) -> float:
        """What is left of the account's 7-day window per hour to its reset: the pace at which it
        must be used to lose none of it (0: the window not standing)."""
        hours = self.seconds_left(account, "seven_day") / 3600
        window = self.standing(account, "seven_day")
        return (1.0 - window.utilization) / hours if window is not None and hours > 0 else 0.0

    def seconds_to_wall(self, account: str, period: str) -> float | None:
        """At the account's own measured rate, seconds until `period` is used up (infinity: not
        burning; None: its rate not measured yet)."""
        window = self.standing(account, period)
        if window is None or window.per_hour is None:
            return None
        return max(0.0, 1.0 - window.utilization) / window.per_hour * 3600 if window.per_hour > 0 else math.inf


CACHE_WRITE, CACHE_READ = 1.25, 0.1
"""What a prompt-cache token costs against an input token, written and read (the API's published
prices): a move writes the session's whole context cold on the new account, where it would have
been read warm."""


def move_cost(context: int | None, read: int, written: int, running: float) -> float | None:
    """Seconds of the session's own work a move costs: its `context` (tokens, its last answer's
    cache read and written) written cold instead of read warm, at the rate the session has spent
    (`read` and `written` cache tokens in its `running` seconds, priced as the API prices them).
    None: not measured yet."""
    spent = CACHE_WRITE * written + CACHE_READ * read
    if not context or spent <= 0 or running <= 0:
        return None
    return (CACHE_WRITE - CACHE_READ) * context * running / spent


def worth_waiting(wait: float, cost: float | None, most: float) -> bool:
    """Whether a session should wait `wait` seconds for its account's reset rather than move: the
    wait is shorter than what the move would cost it (`move_cost`), and at `most` seconds."""
    return cost is not None and 0 < wait <= min(cost, most)


CLEAR_ROOM = 0.2
"""How much emptier another account must be for a session to move early to it: it must be
clearly better, not a coin toss that moves it back next turn."""


def early_move(
    outlook: Outlook,
    account: str,
    move_at: float,
    warned: str | None = None,
    *,
    cost: float | None = None,
    most: float = 0.0,
) -> tuple[bool, str]:
    """Whether a session on `account` should move before its next turn, and why. Its fullest
    window past `move_at` (or `warned`, the window the API says `allowed_warning` about) decides:
    the session holds if that window resets before the account's own burn rate would use it up
    (a move costs its prompt cache, cold on the new account, and buys nothing then), or if the
    wait from the wall to the reset is shorter than what a move costs it (`cost`, seconds of its
    work: `move_cost`) and than `most` seconds (it then waits at the wall: `worth_waiting`); else
    it moves. A window whose rate is not measured yet is taken to be used up first."""
    crossed = [
        (window.utilization, period)
        for period in PERIODS
        if (window := outlook.standing(account, period)) is not None
        and (window.utilization >= move_at or period == warned)
    ]
    if not crossed:
        return False, f"{account} is under move_at ({move_at:.0%})"
    utilization, period = max(crossed)
    left = outlook.seconds_left(account, period)
    said = f"{account} at {utilization:.0%} of {PERIODS[period]}, resets in {span(left)}"
    to_wall = outlook.seconds_to_wall(account, period)
    if to_wall is not None and left <= to_wall:
        return False, f"held: {said}, before it would be used up" + (
            f" (in {span(to_wall)})" if to_wall != math.inf else ""
        )
    if to_wall is not None and worth_waiting(left - to_wall, cost, most):
        assert cost is not None
        waited = span(left - to_wall)
        return False, f"held: {said}, {waited} after it would be used up, less than a move costs ({span(cost)})"
    return True, f"{MOVED_EARLY}: {said}"


def clearly_emptier(outlook: Outlook, live: Mapping[str, int], source: str, move_at: float, name: str) -> bool:
    """Whether `name` has clearly more room than `source` for one more session: projected to stay
    under `move_at` with it, and `CLEAR_ROOM` emptier now."""
    return (
        outlook.projected(name, live.get(name, 0) + 1) < move_at
        and outlook.used(name) <= outlook.used(source) - CLEAR_ROOM
    )
