"""kill -9 cl-rescue at random points during moves: no session lost, none resumed twice."""

from __future__ import annotations

import random
from pathlib import Path

from crash import trial, walled_template
from utils import Planted

TRIALS = 20


def test_killing_the_rescuer_mid_move_loses_nothing_and_resumes_nothing_twice(tmp_path: Path, planted: Planted) -> None:
    template = walled_template(tmp_path / "template", planted)
    rng = random.Random(20261127)
    verdicts = [trial(template, tmp_path / f"trial-{i}", planted, rng) for i in range(TRIALS)]
    problems = [f"trial {i} (kill after {v.delay:.3f}s): {p}" for i, v in enumerate(verdicts) for p in v.problems]
    assert not problems, "\n".join(problems)
    # The kills landed before, during and after the moves, not all at one point.
    assert len({v.moves_before_kill for v in verdicts}) >= 2
