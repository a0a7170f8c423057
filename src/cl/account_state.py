"""An account's one state, the same in `cl accounts`, `cl status`, `--json`, the metrics and the
dashboard: made here from its file, its wall, its settings and its probation, and nowhere else.

The first that holds wins:

* `invalid`: its credential file is not a usable credential (the reason says why);
* `needs-login`: its token expired or was blanked, or the gateway's refresh was refused;
* `paused`: an operator paused it (`cl accounts pause`), walled or not;
* `walled`: a wall stands (the window, and until when, if known);
* `probation`: its wall's reset passed but it has not answered since, so it takes one session;
* `ok`.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

from cl.credentials import Account, AccountState
from cl.moments import iso_utc
from cl.store import NEEDS_LOGIN, AccountSettings, WallRecord


class State(enum.StrEnum):
    OK = "ok"
    WALLED = "walled"
    PAUSED = "paused"
    NEEDS_LOGIN = "needs-login"
    INVALID = "invalid"
    PROBATION = "probation"


REFUSED = "its refresh token was refused: log in and copy the new credentials over its file"
EXPIRED = "its token expired: log in (claude setup-token) and copy the new credential over its file"
PROBATION = "its wall's reset passed: it takes one session until it answers"


class Standing(NamedTuple):
    state: State
    reason: str | None = None
    window: str | None = None
    """The window that walled it (`five_hour`, `seven_day`, ...), if known."""
    until: float | None = None
    """When its wall resets (Unix time), if known."""

    def public(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "reason": self.reason,
            "window": self.window,
            "walled_until": iso_utc(self.until) if self.until is not None else None,
        }


def standing(account: Account, wall: WallRecord | None, settings: AccountSettings | None, probation: bool) -> Standing:
    """`wall` is the account's standing wall, if any; `probation`, whether its wall's reset passed
    without an answer since."""
    if account.state is AccountState.INVALID:
        return Standing(State.INVALID, account.reason)
    if account.state is AccountState.EXPIRED:
        return Standing(State.NEEDS_LOGIN, EXPIRED)
    if account.state is AccountState.NEEDS_LOGIN:
        return Standing(State.NEEDS_LOGIN, account.reason)
    if wall is not None and wall.kind == NEEDS_LOGIN:
        return Standing(State.NEEDS_LOGIN, REFUSED)
    if settings is not None and settings.paused_at is not None:
        return Standing(State.PAUSED, f"paused since {iso_utc(settings.paused_at)}: cl accounts resume {account.name}")
    if wall is not None:
        return Standing(State.WALLED, None, wall.kind, wall.reset_at)
    if probation:
        return Standing(State.PROBATION, PROBATION)
    return Standing(State.OK)
