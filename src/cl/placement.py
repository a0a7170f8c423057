"""Which account takes the next piece of work: one implementation, for placement and rescue.

Eligible: state `ok` in the registry (so its file exists now), no standing wall, fewer live runs
than `max_sessions` (than one while on probation: its wall has reset but it has not answered
since, so a still-walled account cannot swallow the whole queue). Then, by policy:
* `headroom`: the lowest reported utilization (the larger of the 5-hour and 7-day windows), then
  the fewest live runs, then the least recently used, then the name;
* `fill-first`: the account with the most live runs that still has room, then the name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping

from cl.credentials import Account
from cl.store import Facts, NoRoom


def eligible(
    roster: Mapping[str, Account],
    walled: Collection[str],
    live: Mapping[str, int],
    max_sessions: int,
    probation: Collection[str] = (),
) -> list[Account]:
    return [
        account
        for name, account in roster.items()
        if account.usable and name not in walled and live.get(name, 0) < limit(name, max_sessions, probation)
    ]


def limit(account: str, max_sessions: int, probation: Collection[str]) -> int:
    """How many live runs `account` may have now."""
    return 1 if account in probation else max_sessions


def choose(
    candidates: list[Account],
    live: Mapping[str, int],
    usage: Mapping[str, Mapping[str, float | None]],
    policy: str = "headroom",
) -> Account | None:
    if not candidates:
        return None
    if policy == "fill-first":
        return min(candidates, key=lambda a: (-live.get(a.name, 0), a.name))

    def room(account: Account) -> tuple[float, int, float, str]:
        facts = usage.get(account.name, {})
        utilization = max(facts.get("five_hour") or 0.0, facts.get("seven_day") or 0.0)
        return (utilization, live.get(account.name, 0), facts.get("last_used_at") or 0.0, account.name)

    return min(candidates, key=room)


class Placer:
    """One pass's placements over the accounts eligible now (the registry's, as passed in): each
    piece of work goes to the policy's choice; an account found walled or full inside its own
    transaction (`NoRoom`: the other daemon got there first) is dropped and the next one tried."""

    def __init__(self, roster: Mapping[str, Account], facts: Facts, max_sessions: int, policy: str) -> None:
        self._live = facts.live
        self._usage = facts.usage
        self._probation = facts.probation
        self._max_sessions = max_sessions
        self._policy = policy
        self._candidates = eligible(roster, facts.walls, facts.live, max_sessions, facts.probation)

    async def take(self, attempt: Callable[[str, int], Awaitable[bool]]) -> bool:
        """Offer one piece of work: `attempt(account, limit)` writes it there (True) or finds the
        work gone meanwhile (False). False only when no account is eligible: the work waits."""
        while (account := choose(self._candidates, self._live, self._usage, self._policy)) is not None:
            room = limit(account.name, self._max_sessions, self._probation)
            try:
                taken = await attempt(account.name, room)
            except NoRoom:
                self._candidates.remove(account)
                continue
            if taken:
                self._live[account.name] = self._live.get(account.name, 0) + 1
                if self._live[account.name] >= room:
                    self._candidates.remove(account)
            return True
        return False
