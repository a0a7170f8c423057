"""The state store: jobs, runs, walls, usage, operators' settings and an append-only ledger.

One interface (`Store`, its records in `cl.store.records`), two backends: an SQLite file, the
embedded default (`cl.store.sqlite`), and a PostgreSQL database a fleet of hosts shares
(`cl.store.postgresql`, with `store = "postgresql://…"`). The transactions are written once
(`cl.store.transactions`); what differs per engine lives in its backend. `AsyncStore` runs the
blocking calls off the event loop.
"""

from cl.store.asynchronous import AsyncStore
from cl.store.backend import Lookup
from cl.store.records import (
    BUSY_TIMEOUT,
    HISTORY_HOURS,
    MOVED_EARLY,
    NEEDS_LOGIN,
    UNSET,
    AccountCounts,
    AccountSettings,
    Facts,
    Home,
    HostRecord,
    Job,
    Listing,
    NoRoom,
    Placement,
    Published,
    Renewal,
    Run,
    Snapshot,
    StoreError,
    StoreUnavailable,
    UsageRow,
    WallRecord,
    Window,
    family,
    model_walled,
    retry_delay,
)
from cl.store.transactions import Store

__all__ = [
    "BUSY_TIMEOUT",
    "HISTORY_HOURS",
    "MOVED_EARLY",
    "NEEDS_LOGIN",
    "UNSET",
    "AccountCounts",
    "AccountSettings",
    "AsyncStore",
    "Facts",
    "Home",
    "HostRecord",
    "Job",
    "Listing",
    "Lookup",
    "NoRoom",
    "Placement",
    "Published",
    "Renewal",
    "Run",
    "Snapshot",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "UsageRow",
    "WallRecord",
    "Window",
    "family",
    "model_walled",
    "retry_delay",
]
