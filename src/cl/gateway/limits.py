"""What an API response says about its account: the `anthropic-ratelimit-unified-*` headers.

`status` is `allowed`, `allowed_warning` or `rejected`; `reset` an epoch second; the
representative claim names the window that decides (`five_hour`, `seven_day`, ...); the 5-hour and
7-day utilizations are fractions. A 429 whose unified status is `rejected` is a usage wall; a
429 without it is the API limiting requests, not the account's usage, and walls nothing.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

PREFIX = "anthropic-ratelimit-unified-"
WINDOWS = {"5h": "five_hour", "7d": "seven_day"}
MAX_RESET_AHEAD = 8 * 86400
"""Seconds ahead a reset may be at most: the longest window is a week (a wild header benches no longer)."""
_CACHE = re.compile(rb'"(cache_read_input_tokens|cache_creation_input_tokens)"\s*:\s*(\d{1,12})')


@dataclasses.dataclass(frozen=True, slots=True)
class Reading:
    status: str | None = None
    reset: float | None = None
    claim: str | None = None
    utilization: dict[str, float] = dataclasses.field(default_factory=dict)
    """`five_hour`, `seven_day`: as reported, clamped to 0..1."""
    resets: dict[str, float] = dataclasses.field(default_factory=dict)
    """`five_hour`, `seven_day`: when each resets (epoch seconds), as `reset` is bounded."""
    overage: bool = False
    """The answer was billed as paid overage (`overage-in-use: true`): the windows are used up."""

    @property
    def rejected(self) -> bool:
        return self.status == "rejected"


def read(headers: Mapping[str, str], now: float) -> Reading:
    """The reading of one response's headers (absent or malformed values are left out)."""
    utilization, resets = {}, {}
    for short, window in WINDOWS.items():
        value = _number(headers.get(f"{PREFIX}{short}-utilization"))
        if value is not None:
            utilization[window] = min(max(value, 0.0), 1.0)
        if (at := _moment(headers.get(f"{PREFIX}{short}-reset"), now)) is not None:
            resets[window] = at
    reset = _moment(headers.get(f"{PREFIX}reset"), now)
    return Reading(
        status=_word(headers.get(f"{PREFIX}status")),
        reset=reset,
        claim=_word(headers.get(f"{PREFIX}representative-claim")),
        utilization=utilization,
        resets=resets,
        overage=headers.get(f"{PREFIX}overage-in-use") == "true",
    )


def cache_tokens(head: bytes) -> tuple[int, int]:
    """Prompt-cache tokens read and created, from the start of a response (a stream's
    `message_start` carries them; a JSON body's `usage`): the first of each found."""
    found: dict[bytes, int] = {}
    for match in _CACHE.finditer(head):
        found.setdefault(match.group(1), int(match.group(2)))
    return found.get(b"cache_read_input_tokens", 0), found.get(b"cache_creation_input_tokens", 0)


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _moment(text: str | None, now: float) -> float | None:
    """A reset header's epoch second, no earlier than now and no later than `MAX_RESET_AHEAD`."""
    value = _number(text)
    return None if value is None else min(max(value, now), now + MAX_RESET_AHEAD)


def _word(text: str | None) -> str | None:
    return text if text is not None and re.fullmatch(r"[a-z0-9_]{1,40}", text) else None
