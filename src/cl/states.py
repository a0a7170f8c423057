"""A job's and a run's states, and the one table of the transitions between them.

A job is what an operator submitted; a run is one stint of its session on one account: the
first, then one per move or follow-up (a live one goes on in the same CLI process). The store
is the only writer of either, and it enforces `JOB_TRANSITIONS` and
`RUN_TRANSITIONS` on every update (`cl.store`): an update to a state the table does not allow
from the current one raises `IllegalTransition` and changes nothing. docs/design.md draws it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class JobState(enum.StrEnum):
    QUEUED = "queued"
    """Waiting for an eligible account."""
    RUNNING = "running"
    """A run is starting or running."""
    DONE = "done"
    FAILED = "failed"
    WALLED = "walled"
    """Its account hit a wall; the rescuer moves it."""
    ORPHANED = "orphaned"
    """Its worker is gone without an outcome; the rescuer resumes it."""
    CANCELLED = "cancelled"


class RunState(enum.StrEnum):
    STARTING = "starting"
    """Written before the worker is launched; the worker claims it."""
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    WALLED = "walled"
    ABANDONED = "abandoned"
    """Never claimed: the launcher died first. Its job went back to where it was."""
    ORPHANED = "orphaned"
    """Claimed, then the worker vanished without an outcome."""
    CANCELLED = "cancelled"
    """Its job was cancelled while it ran: the CLI was stopped, nothing resumes it."""


_ENDS = frozenset({RunState.DONE, RunState.FAILED, RunState.WALLED, RunState.ORPHANED, RunState.CANCELLED})

JOB_TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(  # its run ended; an abandoned one puts it back where it was
        {JobState.DONE, JobState.FAILED, JobState.WALLED, JobState.ORPHANED, JobState.CANCELLED, JobState.QUEUED}
    ),
    # moved, requeued, cancelled, or given up (moved or orphaned too often: `Store.give_up`)
    JobState.WALLED: frozenset({JobState.RUNNING, JobState.QUEUED, JobState.CANCELLED, JobState.FAILED}),
    JobState.ORPHANED: frozenset({JobState.RUNNING, JobState.QUEUED, JobState.CANCELLED, JobState.FAILED}),
    JobState.DONE: frozenset({JobState.QUEUED}),  # a follow-up (`cl send`) resumes the session
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset(),
}
RUN_TRANSITIONS: Mapping[RunState, frozenset[RunState]] = {
    RunState.STARTING: frozenset({RunState.RUNNING, RunState.ABANDONED, *_ENDS}),  # claimed, or never
    RunState.RUNNING: _ENDS,
    **{end: frozenset() for end in (*_ENDS, RunState.ABANDONED)},
}

LIVE_RUNS = (RunState.STARTING, RunState.RUNNING)
LIVE_JOBS = (JobState.QUEUED, JobState.RUNNING, JobState.WALLED, JobState.ORPHANED)
FINISHED_JOBS = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)
RESCUABLE = (JobState.WALLED, JobState.ORPHANED)
"""The rescuer's jobs: their session moves (resumes) to another account."""


class IllegalTransition(Exception):
    """A state change the table does not allow: a bug, never a race (races lose quietly)."""
