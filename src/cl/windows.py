"""An account's windows (`five_hour`, `seven_day`) as the API's headers last said them, and what
they say now: the one rule for placement (`cl.pacing`) and for what `cl accounts` shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from cl.moments import iso_utc


class Window(NamedTuple):
    """One of an account's windows (`five_hour`, `seven_day`) as the API's headers last said it."""

    utilization: float
    reset_at: float | None
    per_hour: float | None
    """Its burn rate: utilization gained per hour, each measure between readings of one period
    at least a step (`burn_step`) apart, averaged with the one before (half each); None until measured."""
    read_at: float | None = None
    """When the API said it (its age: an account nobody used is read by the gateway's probe)."""
    after_wall: bool = False
    """Its period follows a wall: the account had a window used up when it was last read before
    (with `ramp_after_wall`, new work ramps onto it)."""
    per_session: float | None = None
    """Its burn rate per session: each measure of `per_hour` over the runs live on the account
    when it was taken (none live: not measured), averaged the same way; None until measured."""

    def standing(self, now: float) -> bool:
        """Its reset is ahead, so what it says holds (one past its reset, or with none named, is
        empty until the API says otherwise)."""
        return self.reset_at is not None and self.reset_at > now

    def public(self) -> dict[str, Any]:
        return {
            "utilization": self.utilization,
            "resets": iso_utc(self.reset_at) if self.reset_at else None,
            "per_hour": self.per_hour,
            "read": iso_utc(self.read_at) if self.read_at else None,
            "after_wall": self.after_wall,
            "per_session": self.per_session,
        }


def first_since_wall(windows: Mapping[str, Window], now: float) -> bool:
    """Whether an account's 5-hour window (of its `windows`, by period) is its first since a wall:
    read since its period began, and the account had a window used up at its reading before
    (`Window.after_wall`); or not read since, and one of its windows was read used up and has
    reset since."""
    five_hour = windows.get("five_hour")
    if five_hour is not None and five_hour.standing(now):
        return five_hour.after_wall
    return any(window.utilization >= 1 and not window.standing(now) for window in windows.values())
