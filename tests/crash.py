"""Kill -9 cl-rescue in the middle of moves, start it again, and judge what every session became.

Used by tests/test_rescue_crash.py (a few trials in CI) and bench/crash.py (as many as asked).
The starting point is made once, for real: three sessions that walled on a1..a3 under both
daemons and the fake `claude`. Each trial copies it, starts cl-rescue, drops a fourth account
in, kills the rescuer with SIGKILL after a random delay, starts it again and waits for every
session to settle.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

from cl.store import Job, Store
from utils import DaemonProcess, Layout, Planted, both, cl, oauth_credential, wait_until, write_credential

SESSIONS = 3


@dataclasses.dataclass(frozen=True)
class Verdict:
    delay: float
    """Seconds between the file landing and SIGKILL."""
    moves_before_kill: int
    """Moves to a4 written when the kill came (0 to 3)."""
    problems: list[str]


def walled_template(root: Path, planted: Planted) -> Layout:
    """Three sessions walled on a1..a3 (every account walled), the daemons stopped."""
    layout = Layout(root)
    tokens = [planted.token() for _ in range(SESSIONS)]
    for i, token in enumerate(tokens, start=1):
        write_credential(layout.credentials, f"a{i}", oauth_credential(planted, token=token))
    layout.quota(dict.fromkeys(tokens, 0))
    with both(layout) as (_balancer, rescue):
        for i in range(SESSIONS):
            cl(layout, "submit", "--cwd", str(layout.work), "--prompt", f"task {i}")
        wait_until(lambda: f"sessions={SESSIONS}" in rescue.log(), "every session to wait")
    for log in root.glob("*.log"):
        log.unlink()
    return layout


def trial(template: Layout, root: Path, planted: Planted, rng: random.Random) -> Verdict:
    shutil.copytree(template.root, root, symlinks=True)
    layout = Layout(root)
    (layout.root / "fake-claude.jsonl").unlink(missing_ok=True)
    moves_before = _events(layout).count("move started")
    rescue = DaemonProcess("rescue", layout).start()
    a4 = planted.token()
    write_credential(layout.credentials, "a4", oauth_credential(planted, token=a4))
    delay = rng.uniform(0, 0.3)
    time.sleep(delay)  # a random point in the moves: the kill is what is random, not what we assert
    rescue.stop(signal.SIGKILL)
    moves_before_kill = _events(layout).count("move started") - moves_before
    rescue = DaemonProcess("rescue", layout).start()
    try:
        wait_until(lambda: {job.state for job in _jobs(layout)} == {"done"}, "every session to finish", timeout=60)
        wait_until(lambda: _events(layout).count("move settled") >= SESSIONS, "every move to be settled")
    finally:
        rescue.stop()
    return Verdict(delay, moves_before_kill, _problems(layout, a4))


def _problems(layout: Layout, a4: str) -> list[str]:
    problems = []
    jobs = _jobs(layout)
    if len(jobs) != SESSIONS:
        problems.append(f"{len(jobs)} jobs, not {SESSIONS}")
    calls = [call for call in layout.claude_calls() if "--resume" in call["argv"]]
    per_session = Counter(call["session_id"] for call in calls)
    for job in jobs:
        if per_session[job.session_id] != 1:
            problems.append(f"job {job.id}: resumed {per_session[job.session_id]} times")
        transcripts = list((layout.state / "sessions" / f"job-{job.id}" / "projects").rglob("*.jsonl"))
        if len(transcripts) != 1 or "Hi from fake claude" not in transcripts[0].read_text():
            problems.append(f"job {job.id}: transcript lost or not continued")
    problems += [
        f"session {call['session_id']}: resumed without its history on a4"
        for call in calls
        if call["token_tail"] != a4[-6:] or call["history"] < 1
    ]
    return problems


def _store(layout: Layout) -> Store:
    return Store(layout.state / "cl.db")


def _jobs(layout: Layout) -> list[Job]:
    store = _store(layout)
    try:
        return store.jobs()
    finally:
        store.close()


def _events(layout: Layout) -> list[str]:
    store = _store(layout)
    try:
        return [entry["event"] for entry in store.ledger(100_000)]
    finally:
        store.close()
