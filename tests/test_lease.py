"""A worker's lease (`cl.lease`) on a real store, with a real CLI process to stop: a renewal that
finds the session changed hands stops the CLI; renewals that cannot go through stop it before
the lease can lapse; a worker with no CLI running is left to finish, and a CLI it starts once
the lease is lost is stopped at once."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cl.cli_process import CliProcess, Events, Output
from cl.cli_user import CliUser
from cl.lease import EXIT_LEASE_LOST, Lease
from cl.states import RunState
from cl.store import Renewal, Run, Store, StoreUnavailable
from utils import wait_until

LEASE = 3.0


@pytest.fixture
def claimed(tmp_path: Path) -> Iterator[tuple[Store, Run]]:
    store = Store(tmp_path / "cl.db")
    job = store.add_job("/srv", "leased")
    run = store.place(job.id, "a1", limit=1)
    assert run is not None
    claimed = store.claim(run.id, os.getpid(), "start", os.devnull, lease=LEASE)
    assert claimed is not None
    yield store, claimed
    store.close()


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[CliProcess]:
    """A child that runs until it is killed, started as the worker starts its CLI."""
    output = Output(tmp_path / "run.log")
    pipe = subprocess.PIPE
    process = CliProcess(
        subprocess.Popen(["sleep", "600"], stdin=pipe, stdout=pipe, stderr=pipe, start_new_session=True),
        cli=CliUser.own(),
        events=Events(),
        output=output,
    )
    yield process
    process.signal_tree(signal.SIGKILL)
    process.close()
    process.join()
    for stream in (process.process.stdin, process.process.stdout, process.process.stderr):
        if stream is not None:
            stream.close()
    output.close()


class Ended:
    """The worker's end, as the lease calls it (instead of `os._exit`)."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.event = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.event.set()


def leased(renew: Callable[[int, float], Renewal], run: Run, ended: Ended) -> Lease:
    lease = Lease(renew, LEASE, run.id, end_worker=ended)
    lease.start()
    return lease


def test_a_fenced_worker_stops_its_cli_and_ends(claimed: tuple[Store, Run], cli: CliProcess) -> None:
    store, run = claimed
    ended = Ended()
    lease = leased(store.renew, run, ended)
    lease.hold(cli)
    assert store.renew(run.id, LEASE) is Renewal.RENEWED
    store.settle(run.id, RunState.ORPHANED, "taken over")  # the rescuer: the job's epoch moves on
    assert ended.event.wait(30)
    assert ended.codes == [EXIT_LEASE_LOST]
    assert cli.process.poll() is not None  # killed before the worker ended
    lease.end()


def test_renewals_that_cannot_go_through_stop_the_cli_before_the_lease_lapses(
    claimed: tuple[Store, Run], cli: CliProcess
) -> None:
    store, run = claimed
    out_of_reach = threading.Event()

    def renew(run_id: int, seconds: float) -> Renewal:
        if out_of_reach.is_set():
            raise StoreUnavailable("the state store is out of reach")
        return store.renew(run_id, seconds)

    ended = Ended()
    lease = leased(renew, run, ended)
    lease.hold(cli)
    wait_until(lambda: (store.get_run(run.id) or run).lease_until != run.lease_until, "a renewal")
    out_of_reach.set()
    assert ended.event.wait(30)
    last = store.get_run(run.id)
    assert last is not None
    assert last.lease_until is not None
    assert store.lapsed() == []  # the CLI is gone, and the lease has not lapsed yet
    assert cli.process.poll() is not None
    lease.end()


def test_a_worker_without_a_cli_is_left_to_finish_and_a_cli_it_starts_then_is_stopped(
    claimed: tuple[Store, Run], cli: CliProcess
) -> None:
    _, run = claimed

    def renew(_run_id: int, _seconds: float) -> Renewal:
        raise StoreUnavailable("the state store is out of reach")

    ended = Ended()
    lease = leased(renew, run, ended)
    assert not ended.event.wait(LEASE)  # two thirds of a lease and more: nothing to stop yet
    lease.hold(cli)
    assert ended.codes == [EXIT_LEASE_LOST]
    assert cli.process.poll() is not None
    lease.end()
