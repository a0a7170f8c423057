"""The job and run state machine: the store refuses every transition the table does not allow,
and allows every one it does (each pair tried on a real SQLite file and a real PostgreSQL database)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from cl.states import JOB_TRANSITIONS, RUN_TRANSITIONS, IllegalTransition, JobState, RunState
from cl.store import Store
from cl.store.sqlite import SqliteBackend


@pytest.mark.parametrize("kind", ["job", "run"])
def test_every_transition_is_allowed_or_refused_as_the_table_says(store_at: Path | str, kind: str) -> None:
    store = Store(store_at)
    job = store.add_job("/srv/work", "p")
    run = store.place(job.id, "a1", limit=1)
    assert run is not None
    table, states, row = (JOB_TRANSITIONS, JobState, job.id) if kind == "job" else (RUN_TRANSITIONS, RunState, run.id)

    def state_now() -> str:
        return str(store._row(f"SELECT state FROM {kind}s WHERE id = ?", (row,))[0])

    for source, target in itertools.product(states, states):
        with store.transaction() as db:  # put the row in `source` to begin with, past the table
            if isinstance(store_at, Path):
                db.execute(f"DROP TRIGGER temp.{kind}s_transitions")
            else:
                db.execute("SET LOCAL session_replication_role = replica")  # no trigger fires
            db.execute(f"UPDATE {kind}s SET state = ? WHERE id = ?", (source, row))
        if isinstance(store._backend, SqliteBackend):
            store._backend._enforce_transitions()
        if source == target or target in table[source]:  # type: ignore[index]
            with store.transaction() as db:
                db.execute(f"UPDATE {kind}s SET state = ? WHERE id = ?", (target, row))
            assert state_now() == target
        else:
            with pytest.raises(IllegalTransition, match=f"illegal {kind} transition"), store.transaction() as db:
                db.execute(f"UPDATE {kind}s SET state = ? WHERE id = ?", (target, row))
            assert state_now() == source, (source, target)
    store.close()


def test_the_tables_end_where_work_ends_and_reach_every_state() -> None:
    for table, start, ends in (
        (JOB_TRANSITIONS, JobState.QUEUED, {JobState.CANCELLED}),  # done and failed take a follow-up
        (RUN_TRANSITIONS, RunState.STARTING, set(RunState) - {RunState.STARTING, RunState.RUNNING}),
    ):
        assert set(table) == set(type(start))  # every state has a row
        assert {state for state, targets in table.items() if not targets} == ends
        reached, frontier = {start}, [start]
        while frontier:
            for target in table[frontier.pop()]:  # type: ignore[index]
                if target not in reached:
                    reached.add(target)
                    frontier.append(target)
        assert reached == set(type(start))
    assert JOB_TRANSITIONS[JobState.DONE] == JOB_TRANSITIONS[JobState.FAILED] == {JobState.QUEUED}


def test_states_are_typed_as_read() -> None:
    assert isinstance(JobState("queued"), JobState)


def test_a_job_read_back_has_its_state_as_the_enum(store: Store) -> None:
    job = store.add_job("/srv/work", "p")
    read = store.get_job(job.id)
    assert read is not None
    assert type(read.state) is JobState
    run = store.place(job.id, "a1", limit=1)
    assert run is not None
    assert type(run.state) is RunState
    assert (run.is_move, run.launcher) == (False, "balancer")
