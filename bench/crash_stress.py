"""Crash stress (`python bench/crash_stress.py [--trials N] [--store postgresql]`): kill -9 mid-work.

The trial of tests/test_crash.py (tests/crash.py), as many times as asked, alternating the
victim: three walled sessions held for a live move and three queued jobs, two healthy accounts
dropped in, SIGKILL to cl-rescue, cl-balancer or the whole host (both, and every worker, their
CLIs with them) after a random delay while another writer locks the store at random moments past
its busy timeout, a restart, a verdict on every job. Prints the tally per victim, how many moves
were live, the restart-to-READY times, how often the store was found locked, and every problem
(lost, run twice, two live processes of a session, a transcript lost). With `--store postgresql`
the store is a PostgreSQL database (a server of the bench's own, as the tests start theirs), the
random locker is left out, and the database itself is a victim too: every process of the server
killed -9 mid-work, then started again (crash recovery). `make bench` runs both.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from run import ms, percentile

import postgres
from crash import QUEUED, WALLED, Verdict, trial
from utils import Planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    planted = Planted()
    rng = random.Random(args.seed)
    server = postgres.Server() if args.store == "postgresql" else None
    victims = ("rescue", "balancer", "host", *(("database",) if server is not None else ()))
    with tempfile.TemporaryDirectory(prefix="cl-crash-") as tmp, contextlib.ExitStack() as stack:
        if server is not None:
            stack.callback(server.stop)
        verdicts = []
        for i in range(args.trials):
            victim = victims[i % len(victims)]
            try:
                verdicts.append(trial(Path(tmp) / f"trial-{i}", planted, rng, victim, server))
            except AssertionError as exc:  # a trial that never settled: a problem to show, with its files
                kept = Path(tempfile.mkdtemp(prefix=f"cl-crash-{i}-"))
                shutil.copytree(Path(tmp) / f"trial-{i}", kept, dirs_exist_ok=True, symlinks=True)
                verdicts.append(Verdict(victim, 0.0, -1, 0, 0, 0.0, [f"trial {i}: {exc} (its files: {kept})"]))
        texts = [log.read_text(errors="replace") for log in sorted(Path(tmp).rglob("*.log"))]
        leaks = [leak for text in texts for leak in planted.leaks(text, "a log")]
        locked = sum(text.count("state store unavailable") for text in texts)
    failed = 0
    for victim in victims:
        mine = [v for v in verdicts if v.victim == victim]
        problems = [p for v in mine for p in v.problems]
        failed += len(problems)
        restarts = [v.restart for v in mine if v.work_before_kill >= 0] or [0.0]
        named = {"database": "kill -9 the database", "host": "kill -9 the whole host"}
        what = named.get(victim, f"kill -9 cl-{victim}")
        print(
            f"{what} ({args.store}): {len(mine)} trials, {len(mine) * (WALLED + QUEUED)} jobs;"
            f" work written before the kill: {dict(sorted(Counter(v.work_before_kill for v in mine).items()))};"
            f" kills with work in flight (jobs not done): {sum(v.unfinished_at_kill > 0 for v in mine)};"
            f" moves onto the new accounts made live: {sum(v.live_moves for v in mine)} of {len(mine) * WALLED};"
            f" problems (lost, run twice, two processes, transcript lost): {len(problems)};"
            f" restart to ready p50 {ms(percentile(restarts, 50))} max {ms(max(restarts))}",
            flush=True,
        )
        for problem in problems:
            print(f"  {problem}")
    print(f"store found locked past its busy timeout (logged): {locked} times", flush=True)
    print(f"secrets in logs: {len(leaks)}", flush=True)
    sys.exit(1 if failed or leaks else 0)


if __name__ == "__main__":
    main()
