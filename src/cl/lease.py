"""A worker's lease on its running run, kept in the state store.

The worker renews it every third of `run_lease` seconds. Two things end the worker's claim to
the session, and each stops its CLI before anyone may take the session over:

- **Fenced.** A renewal finds the session changed hands (its run was orphaned: the job's epoch
  moved on). The store refuses every write of an earlier epoch already; the CLI must stop too.
- **Lapsing.** No renewal went through for two thirds of the lease (the store out of reach, the
  link to it black-holed). The CLI is stopped while a third of the lease is still left, so it is
  gone before the lease lapses on the database's clock and the run may be orphaned and resumed.

Renewing and watching are two threads: a renewal stuck on a dead connection cannot hold back
the watch. The lease stops the CLI's whole process group with SIGKILL, waits for it, and ends
the worker (`EXIT_LEASE_LOST`) without writing anything: the rescuer orphans the run (at once if
the store is reachable and the worker is seen gone, else once the lease has lapsed) and resumes it.
A worker with no CLI running (its turn over, its outcome waiting for the store) is left to wait:
whatever it writes is refused if the session has changed hands meanwhile; but a CLI it starts
while the lease lapses, or after it was fenced, is stopped at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

import structlog

from cl.cli_process import CliProcess
from cl.store import Renewal, StoreUnavailable

log = structlog.get_logger("cl.worker")

RETRY = 0.5
"""Seconds between tries while a renewal does not go through, and between the watch's looks."""
EXIT_LEASE_LOST = 75
"""The worker's exit code when it lost its lease (EX_TEMPFAIL: the session resumes)."""
STOP_WAIT = 10.0
"""Seconds the lease waits for the CLI to die of SIGKILL before the worker ends anyway."""
FENCED = "its session changed hands (the run's lease had lapsed)"


class Lease:
    def __init__(
        self,
        renew: Callable[[int, float], Renewal],
        seconds: float,
        run_id: int,
        end_worker: Callable[[int], object] = os._exit,
    ) -> None:
        """`renew(run_id, seconds)` is the store's `renew`, made one call at a time with the
        worker's own; it raises `StoreUnavailable` when it cannot be made now."""
        self.run_id = run_id
        """The run renewed: the worker's current one (a live move or a follow-up goes on in another)."""
        self._process: CliProcess | None = None
        self._renew_call, self._seconds, self._end_worker = renew, seconds, end_worker
        self._renewed_at = time.monotonic()  # the claim leased it
        self._fenced = False
        self._stopped = False
        """The CLI was stopped and the worker ended: once, whichever thread saw the loss first."""
        self._guard = threading.Lock()
        """Taken to change the CLI and to stop it: a CLI started as the lease is lost is stopped too."""
        self._ended = threading.Event()

    def start(self) -> None:
        for target in (self._renew, self._watch):
            threading.Thread(target=target, name=f"lease-{target.__name__[1:]}", daemon=True).start()

    def hold(self, process: CliProcess | None) -> None:
        """The worker's CLI now (None: none runs): stopped at once if the lease is lost already."""
        with self._guard:
            self._process = process
            if process is not None and (reason := self._lost()) is not None:
                self._stop(reason)

    def end(self) -> None:
        """The worker is done with its runs: no more renewals, no more watching."""
        self._ended.set()

    def _renew(self) -> None:
        wait = self._seconds / 3
        while not self._ended.wait(wait):
            sent = time.monotonic()
            renewal = self._try()
            if renewal is Renewal.FENCED:
                with self._guard:
                    self._fenced = True
                    if self._process is not None:
                        self._stop(FENCED)
                return
            if renewal is not None:  # renewed, or nothing running to renew (held, or between runs)
                self._renewed_at = sent
            wait = self._seconds / 3 if renewal is not None else RETRY

    def _try(self) -> Renewal | None:
        try:
            return self._renew_call(self.run_id, self._seconds)
        except StoreUnavailable:
            return None

    def _watch(self) -> None:
        while not self._ended.wait(RETRY):
            with self._guard:
                if self._process is not None and (reason := self._lost()) is not None:
                    self._stop(reason)

    def _lost(self) -> str | None:
        """Why the lease no longer holds the session, if it does not."""
        if self._fenced:
            return FENCED
        if (silent := time.monotonic() - self._renewed_at) > self._seconds * 2 / 3:
            return f"its lease was not renewed for {silent:.0f} s (the state store out of reach)"
        return None

    def _stop(self, reason: str) -> None:
        """Stop the CLI (its whole process group), then the worker."""
        assert self._process is not None
        if self._stopped:  # the other thread waited on the guard while it was stopped
            return
        self._stopped = True
        self._ended.set()
        log.error("lease lost, stopping the CLI", run=self.run_id, reason=reason)
        self._process.signal_tree(signal.SIGKILL)
        try:
            self._process.process.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            log.error("the CLI outlived SIGKILL", run=self.run_id, pid=self._process.pid)
        self._end_worker(EXIT_LEASE_LOST)
