"""The job and run state machine: the store refuses every transition the table does not allow,
and allows every one it does (each pair tried on a real SQLite file)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from cl.states import JOB_TRANSITIONS, RUN_TRANSITIONS, IllegalTransition, JobState, RunState
from cl.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "cl.db")


def test_every_job_transition_is_allowed_or_refused_as_the_table_says(store: Store) -> None:
    job = store.add_job("/srv/work", "p")
    for source, target in itertools.product(JobState, JobState):
        with store.transaction() as db:
            db.execute("DROP TRIGGER temp.jobs_transitions")  # placing the job in `source` to begin with
            db.execute("UPDATE jobs SET state = ? WHERE id = ?", (source, job.id))
        store._enforce_transitions()
        if source == target or target in JOB_TRANSITIONS[source]:
            with store.transaction() as db:
                db.execute("UPDATE jobs SET state = ? WHERE id = ?", (target, job.id))
        else:
            with pytest.raises(IllegalTransition, match="illegal job transition"), store.transaction() as db:
                db.execute("UPDATE jobs SET state = ? WHERE id = ?", (target, job.id))
            assert store.get_job(job.id).state == source, (source, target)  # type: ignore[union-attr]


def test_every_run_transition_is_allowed_or_refused_as_the_table_says(store: Store) -> None:
    job = store.add_job("/srv/work", "p")
    run = store.place(job.id, "a1", limit=1)
    assert run is not None
    for source, target in itertools.product(RunState, RunState):
        with store.transaction() as db:
            db.execute("DROP TRIGGER temp.runs_transitions")
            db.execute("UPDATE runs SET state = ? WHERE id = ?", (source, run.id))
        store._enforce_transitions()
        allowed = source == target or target in RUN_TRANSITIONS[source]
        if allowed:
            with store.transaction() as db:
                db.execute("UPDATE runs SET state = ? WHERE id = ?", (target, run.id))
        else:
            with pytest.raises(IllegalTransition, match="illegal run transition"), store.transaction() as db:
                db.execute("UPDATE runs SET state = ? WHERE id = ?", (target, run.id))
            assert store.get_run(run.id).state == source, (source, target)  # type: ignore[union-attr]


def test_the_tables_end_where_work_ends_and_reach_every_state() -> None:
    for table, start, ends in (
        (JOB_TRANSITIONS, JobState.QUEUED, {JobState.DONE, JobState.FAILED, JobState.CANCELLED}),
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
