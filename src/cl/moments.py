"""Moments as cl stores and shows them: epoch seconds in the store, ISO 8601 UTC to people."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def iso_utc(epoch: float) -> str:
    """An epoch timestamp (as stored) in ISO 8601 UTC, as shown to people and scripts."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def from_epoch(seconds: float) -> datetime | None:
    """The UTC moment of an epoch timestamp read from outside (a file, the CLI); None if no such
    moment exists (out of range)."""
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def span(seconds: float) -> str:
    """A stretch of time in a few characters: `2d3h`, `2h10m`, `4m05s`."""
    whole = int(seconds)
    if whole >= 86400:
        return f"{whole // 86400}d{whole % 86400 // 3600}h"
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 60}m{whole % 60:02d}s"
