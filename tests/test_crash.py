"""kill -9 either daemon, or the whole host (both daemons and every worker), at random points
while it places jobs and moves sessions live: nothing lost, nothing run twice, no session with two
live processes, no transcript lost, and the restarted daemon ready again (how fast is a figure of
bench/crash_stress.py: a test only catches a hang)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import postgres
from crash import Verdict, trial
from utils import Planted

TRIALS = {"rescue": 20, "balancer": 10, "host": 6}


@pytest.mark.parametrize("victim", sorted(TRIALS))
def test_killing_a_daemon_mid_work_loses_nothing_and_runs_nothing_twice(
    victim: str, tmp_path: Path, planted: Planted
) -> None:
    rng = random.Random(f"{victim}-20261127")
    verdicts: list[Verdict] = [trial(tmp_path / f"trial-{i}", planted, rng, victim) for i in range(TRIALS[victim])]
    problems = [f"trial {i} (kill after {v.delay:.3f}s): {p}" for i, v in enumerate(verdicts) for p in v.problems]
    assert not problems, "\n".join(problems)
    if victim != "host":  # a whole host's kill ends every CLI mid-turn: judged by the work in flight
        assert len({v.work_before_kill for v in verdicts}) >= 2  # the kills landed at different points
    assert sum(v.live_moves for v in verdicts) >= len(verdicts)  # the moves were live ...
    assert sum(v.unfinished_at_kill > 0 for v in verdicts) >= len(verdicts) // 2  # ... and in flight at the kill
    slowest = max(v.restart for v in verdicts)
    assert slowest < 5, f"a restart took {slowest:.2f}s"  # a hang, not a speed: the figure is in bench/crash_stress.py


FLEET_TRIALS = {"rescue": 4, "balancer": 4, "database": 4, "host": 4}


@pytest.mark.parametrize("victim", sorted(FLEET_TRIALS))
def test_on_postgresql_killing_a_daemon_a_host_or_the_database_mid_work_loses_nothing(
    victim: str, tmp_path: Path, planted: Planted, postgresql: postgres.Server
) -> None:
    """The same trials with the store on PostgreSQL (the fleet's), and the database itself killed
    mid-work (every process of the server, SIGKILL; it recovers from its write-ahead log)."""
    rng = random.Random(f"{victim}-postgresql-20261205")
    verdicts = [trial(tmp_path / f"trial-{i}", planted, rng, victim, postgresql) for i in range(FLEET_TRIALS[victim])]
    problems = [f"trial {i} (kill after {v.delay:.3f}s): {p}" for i, v in enumerate(verdicts) for p in v.problems]
    assert not problems, "\n".join(problems)
    assert sum(v.unfinished_at_kill > 0 for v in verdicts) >= 1  # work in flight at a kill
