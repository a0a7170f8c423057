"""What a daemon counts while it runs, for `cl-metrics`: counters and latency histograms.

In memory, from the daemon's start (Prometheus reads a restart as a counter reset). Plain
Python, so the daemons need no metrics library; `cl.metrics` turns a `metrics` reply into the
exposition format.
"""

from __future__ import annotations

import bisect
from typing import Any

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
"""Seconds: from a quick move (a fraction of a second) to a session that waited hours for a reset."""


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self._counts = [0] * len(buckets)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        value = max(value, 0.0)
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self._counts):
            self._counts[index] += 1
        self._sum += value
        self._count += 1

    def public(self) -> dict[str, Any]:
        """Cumulative bucket counts (`le` upper bounds, the last `+Inf`), sum and count."""
        cumulative, running = [], 0
        for bound, count in zip(self.buckets, self._counts, strict=True):
            running += count
            cumulative.append([bound, running])
        return {"buckets": [*cumulative, ["+Inf", self._count]], "sum": self._sum, "count": self._count}
