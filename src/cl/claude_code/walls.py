"""Usage walls as the real Claude Code CLI reports them, and when they lift.

Structured signals come first (see `stream.py`); the text forms here are the fallback, and
the source of a reset time when no structured one came. Every form the CLI's versions print
(docs/claude-code.md, fact 6):

    Claude AI usage limit reached|1795814658                 (1.0.x: an epoch)
    Session limit reached ∙ resets 9:24pm                    (1.0.x, U+2219, no zone)
    You've hit your session limit · resets 9pm (UTC)         (2.x)
    You've hit your 5-hour limit · resets 9:15pm (UTC)       (2.1.332)
    You've hit your weekly limit · resets Jul 31, 2am (UTC)
    Weekly limit reached · resets 10am (Asia/Seoul)
    Spending cap reached resets 9:24pm

"Context limit" and "Server is temporarily limiting requests (not your usage limit)" are not
walls.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cl.moments import from_epoch

_WALL_TEXT = re.compile(
    r"hit your (?:[\w-]+ )?limit"
    r"|(?:usage|session|weekly|5-hour|opus|sonnet) limit reached"
    r"|spending cap reached",
    re.IGNORECASE,
)
_NOT_A_WALL = re.compile(r"not your usage limit|context limit", re.IGNORECASE)
_EPOCH = re.compile(r"usage limit reached\|(\d{9,11})", re.IGNORECASE)
_RESETS = re.compile(
    r"resets\s+(?:(?P<month>[A-Z][a-z]{2})\s+(?P<day>\d{1,2}),\s*)?"
    r"(?P<hour>\d{1,2})(?::(?P<minute>\d{2}))?\s*(?P<ampm>am|pm)"
    r"(?:\s*\((?P<zone>[^)]+)\))?",
    re.IGNORECASE,
)
_MONTHS = {
    m: i
    for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], start=1)
}


@dataclasses.dataclass(frozen=True, slots=True)
class Wall:
    """An account hit its usage cap."""

    source: str
    """What told us: `rate_limit_event`, `result`, `assistant` or `text`."""
    reset_at: datetime | None = None
    kind: str | None = None
    """The window, when known: `five_hour`, `seven_day`, `seven_day_opus`, ..."""
    message: str | None = None


def is_wall_text(text: str) -> bool:
    return bool(_WALL_TEXT.search(text) or _EPOCH.search(text)) and not _NOT_A_WALL.search(text)


def reset_from_text(text: str, now: datetime, local: tzinfo | None = None) -> datetime | None:
    """The reset time a wall message names, as an aware UTC datetime; None if it names none.

    A clock time is the next such time after `now`; a date without a year is its next
    occurrence. No zone means the machine's (`local`, by default the system's).
    """
    if match := _EPOCH.search(text):
        return from_epoch(int(match.group(1)))
    match = _RESETS.search(text)
    if match is None:
        return None
    zone = _zone(match.group("zone"), local)
    here = now.astimezone(zone)
    hour = int(match.group("hour")) % 12 + (12 if match.group("ampm").lower() == "pm" else 0)
    minute = int(match.group("minute") or 0)
    if match.group("month"):
        month = _MONTHS.get(match.group("month").lower())
        if month is None:
            return None
        try:
            candidate = here.replace(month=month, day=int(match.group("day")), hour=hour, minute=minute, second=0)
        except ValueError:
            return None
        if candidate < here - timedelta(days=1):
            candidate = candidate.replace(year=candidate.year + 1)
    else:
        candidate = here.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if candidate <= here:
            candidate += timedelta(days=1)
    return candidate.replace(microsecond=0).astimezone(UTC)


def wall_from_text(text: str, now: datetime, local: tzinfo | None = None) -> Wall | None:
    if not is_wall_text(text):
        return None
    return Wall("text", reset_from_text(text, now, local), message=text.strip()[:300])


def _zone(name: str | None, local: tzinfo | None) -> tzinfo:
    if name is None:
        return local if local is not None else datetime.now().astimezone().tzinfo or UTC
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return local if local is not None else UTC
