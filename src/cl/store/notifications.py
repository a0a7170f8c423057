"""What the fleet's hosts tell each other through PostgreSQL: LISTEN/NOTIFY on one channel.

The database notifies `CHANNEL` (triggers made by `PostgresBackend`) when something another host
did may give this host's daemons work: a host's roster changed, a run ended (room on an account),
a wall was lifted, an operator changed an account's settings. The payload is empty: a daemon
woken only runs a pass, which reads the facts as they are now.

`Listener` holds one connection of its own, on a thread, and calls `wake` (thread-safe) for each
notification. A connection that drops is opened again (said once per outage) and `wake` called,
for what passed meanwhile; the daemons' pass every heartbeat stays as the fallback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg
import structlog

log = structlog.get_logger("cl.store")

CHANNEL = "cl_fleet"
RETRY = 1.0
"""Seconds between attempts to listen again."""
POLL = 1.0
"""Seconds between looks at whether the listener is to stop."""
CONNECT_TIMEOUT = 10


class Listener:
    def __init__(self, url: str, name: str, wake: Callable[[], object]) -> None:
        self._url = url
        self._name = name
        self._wake = wake
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-listener", daemon=True)
        self.lost = 0
        """Times the listening connection dropped (or could not be opened)."""

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(CONNECT_TIMEOUT)  # a daemon thread: one stuck connecting ends with the process

    def _run(self) -> None:
        outage = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._url, autocommit=True, application_name=self._name, connect_timeout=CONNECT_TIMEOUT
                ) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    if outage:
                        log.info("listening for the fleet's changes again", listener=self._name)
                        self._wake()  # what was notified meanwhile is lost: a pass reads it
                    outage = False
                    while not self._stop.is_set():
                        for _ in connection.notifies(timeout=POLL, stop_after=1):
                            self._wake()
            except psycopg.Error as exc:
                self.lost += 1
                if not outage:
                    log.warning(
                        "not listening for the fleet's changes: passes every heartbeat until it is back",
                        listener=self._name,
                        error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                    )
                outage = True
                self._stop.wait(RETRY)
