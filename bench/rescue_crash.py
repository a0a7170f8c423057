"""Crash stress (`python bench/rescue_crash.py [--trials N]`, part of `make bench`): kill -9 cl-rescue mid-move.

The same trial as tests/test_rescue_crash.py (tests/crash.py), as many times as asked: three
sessions walled on every account, a fourth account dropped in, SIGKILL to the rescuer after a
random delay, a restart, and a verdict on every session (done, resumed exactly once on the new
account with its history, transcript continued). Prints the tally and any problem.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from crash import Verdict, trial, walled_template
from utils import Planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    planted = Planted()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="cl-crash-") as tmp:
        template = walled_template(Path(tmp) / "template", planted)
        verdicts: list[Verdict] = [trial(template, Path(tmp) / f"trial-{i}", planted, rng) for i in range(args.trials)]
        leaks = [
            leak
            for log in sorted(Path(tmp).rglob("*.log"))
            for leak in planted.leaks(log.read_text(errors="replace"), log.name)
        ]
    problems = [f"trial {i}: {p}" for i, v in enumerate(verdicts) for p in v.problems]
    moved = Counter(v.moves_before_kill for v in verdicts)
    print(
        f"kill -9 cl-rescue mid-move: {len(verdicts)} trials, {len(verdicts) * 3} sessions;"
        f" moves written before the kill: {dict(sorted(moved.items()))};"
        f" problems (a session lost, run twice, or its transcript lost): {len(problems)};"
        f" secrets in logs: {len(leaks)}",
        flush=True,
    )
    for line in problems + leaks:
        print(f"  {line}")
    sys.exit(1 if problems or leaks else 0)


if __name__ == "__main__":
    main()
