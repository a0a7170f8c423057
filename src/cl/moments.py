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
