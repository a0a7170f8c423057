"""A simulated week (`python bench/week.py [--quick] [--rounds N] [--policies a,b]`): seven
placement policies on the same workload, one after the other in one run (with `--rounds`, N
weeks each, the policies in turn each round, and the median week of each printed), each with
the real daemons (cl-balancer, cl-rescue, cl-gateway), their workers and the fake CLI, against
the fake API enforcing budgets.

Time is accelerated: 5 hours last `--five-hour` seconds (3; 2 with `--quick`), and a week 33.6
times that. The fake API gives each of 4 accounts a 5-hour window (it opens at the account's first
request, the gateway's quota check too) and a 7-day window, staggered: account i's week is
(i + 1/2)/4 over when the week begins, so each resets once, at its own time, within the
simulated week. A request costs one unit; an account with a window spent gets the wall (429, its
reset). Sessions are agents: each job is one prompt of `STEPS` requests (tool calls in between,
`LATENCY` seconds each to answer), and as soon as one ends another starts, `SESSIONS` (or
`--sessions`) at once, from the first second to the last. The week begins once the gateway has
read every account's windows (`read_all`).

The policies, as cl runs them (every one keeps cl's moves in flight at a wall):
* `headroom`: cl's until now (the lowest utilization first), no early moves;
* `fill-first`: one account until it has no room, then the next;
* `round-robin`: each account in turn, as CLIProxyAPI does;
* `switch-at-0.98`: fill one account until 98%, then switch, sessions too, as teamclaude does
  (fill-first with `pause_at = 0.98` on every account and `move_at = 0.98`);
* `pace`: `placement = "pace"` and early moves at `move_at = 0.95`;
* `pace-ramping`: `pace`, and after a wall an account takes only the sessions its 5-hour
  window sustains to its reset (`ramp_after_wall`);
* `pace-waiting`: `pace`, and a request waits for its account's reset where that costs the
  session less than a move (`max_wait_for_reset = 300`, scaled).

Printed per policy: turns (answered requests) completed; session-visible 429s (walls the gateway
passed to a CLI: no account had room for it at once), and those of them while the fake API says
some account had room; the time sessions spent waiting (a walled turn until its session's next
answer; a request held at the gateway for its account's reset, where the rescuer found that
cheaper than a move; each job's time queued before its first run, but for the jobs the sessions
start with: all accounts have room then, and they are placed one behind the other's launch), in
simulated hours; moves (in flight at a wall, and early), the cold-cache tokens the moves cost
(the prompt cache the new account wrote for the moved runs) and cold-cache requests per move;
the first time any session waited (simulated hours from the start), what that wait was, the turns
completed before it, and the units of 7-day budget each account still had at its week's reset
before it (lost for good). All of it within the week: what happens after it, as the daemons
stop, is not counted. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import datetime as dt
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_gateway import account, running

from cl.client import call
from cl.store import MOVED_EARLY, Store
from utils import DaemonProcess, FakeApi, Layout, Planted, end_workers, fake_api_running, json_lines, wait_until

ACCOUNTS = ("a1", "a2", "a3", "a4")
SESSIONS = 4
"""Jobs kept going at once: the work the fleet's budgets carry over the week. A session asks for
about 400 turns a week; each account's week resets once in it, so the four have 8 weeks' budget,
1,616 units, for about 1,620 wanted. A policy that leaves budget unused at a reset waits for it
later; `--sessions 8` asks twice that, and every policy runs dry before the second reset."""
STEPS = 12
LATENCY = 0.1
"""Seconds the fake API takes to answer one request (the model's time)."""
FIVE_HOUR_RATE = 25
"""Units one account's 5-hour window holds, per second of it: a session asks about 7 a second."""
WEEK_SHARE = 0.12
"""A 7-day window holds this share of what its 5-hour windows would over a week (the weekly cap
binds first: it is the budget that runs out)."""
QUEUED = 0.25
"""Seconds a new job waits to be placed past which it waited for room (placing takes ~20-50 ms)."""
WEEK = 33.6
"""Five-hour windows in a week."""

POLICIES: dict[str, dict[str, str]] = {
    "headroom": {"CL_PLACEMENT": "headroom", "CL_MOVE_AT": "1"},
    "fill-first": {"CL_PLACEMENT": "fill-first", "CL_MOVE_AT": "1"},
    "round-robin": {"CL_PLACEMENT": "round-robin", "CL_MOVE_AT": "1"},
    "switch-at-0.98": {"CL_PLACEMENT": "fill-first", "CL_MOVE_AT": "0.98"},
    "pace": {"CL_PLACEMENT": "pace", "CL_MOVE_AT": "0.95"},
    "pace-ramping": {"CL_PLACEMENT": "pace", "CL_MOVE_AT": "0.95", "CL_RAMP_AFTER_WALL": "true"},
    "pace-waiting": {"CL_PLACEMENT": "pace", "CL_MOVE_AT": "0.95", "CL_MAX_WAIT_FOR_RESET": "300"},
}
SCALED = frozenset({"CL_MAX_WAIT_FOR_RESET"})
"""A policy's settings that are times, scaled with the week."""
PAUSE_AT = {"switch-at-0.98": 0.98}


@dataclasses.dataclass
class Outcome:
    turns: int
    visible_429s: int
    visible_with_room: int
    waited_hours: float
    moves_in_flight: int
    early_moves: int
    cold_tokens: int
    cold_per_move: float
    first_wait_hours: float | None
    first_wait: str | None
    """What it was: a 429 seen, a job queued, or a request held for its account's reset."""
    turns_before_wait: int
    waits_for_reset: int
    """Requests that waited at the gateway for their account's reset rather than move."""
    unused_at_resets: dict[str, int]
    """Units of 7-day budget each account still had when its week reset, before the first wait:
    lost for good, what using the soonest reset first could have added by then."""


def simulate(policy: str, five_hour: float, sessions: int, root: Path) -> Outcome:
    """One policy's week; what it came to."""
    week = five_hour * WEEK
    budget5 = round(FIVE_HOUR_RATE * five_hour)
    budget7 = round(budget5 * WEEK * WEEK_SHARE)
    scale = five_hour / (5 * 3600)
    planted = Planted()
    layout = Layout(root)
    args = ["--budget", f"five_hour={five_hour}:{budget5}", "--budget", f"seven_day={week}:{budget7}"]
    env = {
        "CL_LOG_LEVEL": "info",
        "CL_BURN_STEP": f"{60 * scale:.6f}",
        "CL_PROBE_INTERVAL": f"{1800 * scale:.6f}",
        "CL_RESET_JITTER": "0",
        "CL_WALL_RETRY": f"{300 * scale:.6f}",
        "CL_MAX_MOVES_PER_HOUR": "1000",
        "CL_MAX_SESSIONS_PER_ACCOUNT": str(sessions),
        **{key: f"{float(value) * scale:.6f}" if key in SCALED else value for key, value in POLICIES[policy].items()},
    }
    with contextlib.ExitStack() as stack:
        stack.callback(end_workers, layout)  # sessions held at the week's end: nothing adopts them
        api = stack.enter_context(fake_api_running(root, *args, "--latency", str(LATENCY)))
        tokens = {name: account(layout, planted, name) for name in ACCOUNTS}
        stagger(api, tokens, week)
        gateway = stack.enter_context(running(layout, api, **env))
        if (pause_at := PAUSE_AT.get(policy)) is not None:  # every account the balancer has
            for listed in gateway.balancer.request({"request": "accounts"})["accounts"]:
                gateway.balancer.request({"request": "account", "account": listed["name"], "pause_at": pause_at})
        wait_until(lambda: read_all(gateway.balancer), "the gateway's first reading of every account", 30)
        resets = stagger(api, tokens, week)  # the week begins: work arrives at a fleet that is up (`read_all`)
        start = time.time()
        drive(layout, start + week, sessions)
        counters = gateway.gateway.request({"request": "metrics"})["counters"]
        at_resets = waits_for_resets(gateway.rescue.log())
    return measured(
        layout, api, start, five_hour, counters, sessions=sessions, resets=Resets(resets, budget7), at_resets=at_resets
    )


def stagger(api: FakeApi, tokens: dict[str, str], week: float) -> dict[str, tuple[str, float]]:
    """Start account i's 7-day window (i + 1/2)/4 of a week ago, each with its budget whole; each
    account's name and when its week resets, by its token's tail (the fake API's log names it so).
    Set as the daemons start, so that their first readings order the resets as the week will, and
    again as the week begins (the wait for those readings moves no reset)."""
    resets = {}
    for i, name in enumerate(ACCOUNTS):
        elapsed = week * (i + 0.5) / len(ACCOUNTS)
        api.post("/_fake/budget", {"key": tokens[name], "elapsed": {"seven_day": elapsed}})
        resets[tokens[name][-6:]] = name, time.time() - elapsed + week
    return resets


def read_all(balancer: DaemonProcess) -> bool:
    """Whether the gateway has read every account's windows (its quota check of an idle account).
    The week starts then, as it does for a fleet whose daemons run before work arrives (their
    store keeps the readings across restarts). Before, `pace` knows no window and places blind;
    at real speed that lasts a second, here it is an hour of a 5-hour window, and the sessions
    placed then run about 4 simulated hours."""
    accounts = balancer.request({"request": "metrics"})["accounts"]
    return len(accounts) == len(ACCOUNTS) and all("seven_day" in a["windows"] for a in accounts)


def waits_for_resets(log: str) -> list[tuple[float, float]]:
    """The requests the rescuer had wait at the gateway for their account's reset (cheaper than a
    move): when, and how long, from its log lines."""
    waits = []
    for line in log.splitlines():
        if "session waits for its account's reset" in line and (found := re.search(r"wait_seconds=([0-9.]+)", line)):
            at = dt.datetime.fromisoformat(line.split(" ", 1)[0]).timestamp()
            waits.append((at, float(found.group(1))))
    return waits


def drive(layout: Layout, until: float, sessions: int) -> None:
    """Keep `sessions` jobs going until `until`."""
    socket = layout.runtime / "balancer.sock"
    store = Store(layout.database)
    live: set[int] = set()
    number = 0
    try:
        while time.time() < until:
            while len(live) < sessions:
                number += 1
                prompt = f"[[steps: {STEPS}]] task {number}"
                reply = call(socket, {"request": "submit", "cwd": str(layout.work), "prompt": prompt})
                live.add(int(reply["job"]))
            with store.transaction(write=False) as db:
                ended = {row[0] for row in db.execute("SELECT id FROM jobs WHERE state IN ('done', 'failed')")}
            live -= ended
            time.sleep(0.05)
    finally:
        store.close()


@dataclasses.dataclass(frozen=True)
class Resets:
    at: dict[str, tuple[str, float]]
    """Each account's name and when its 7-day window resets, by its token's tail (the fake API's
    log names it so)."""
    budget: int
    """Units of one 7-day window."""

    def unused_before(self, requests: list[dict[str, Any]], until: float | None) -> dict[str, int]:
        """Units left in each window that resets before `until` (None: the week's end), at its reset."""
        return {
            name: max(
                0, self.budget - sum(1 for r in requests if r["cred_tail"] == tail and r["t"] < at and r["answered"])
            )
            for tail, (name, at) in self.at.items()
            if until is None or at < until
        }


def measured(
    layout: Layout,
    api: FakeApi,
    start: float,
    five_hour: float,
    counters: dict[str, int],
    *,
    sessions: int,
    resets: Resets,
    at_resets: list[tuple[float, float]],
) -> Outcome:
    """The week's figures, from the fake API's log, the store, the gateway's counters, and the
    waits for a reset (`at_resets`: when, how long) the rescuer chose over a move."""
    hours = 5 / five_hour
    end = start + five_hour * WEEK  # what comes after, as the daemons stop, is not the week's
    requests = [r for r in json_lines(api.log) if "cold" in r and not r["probe"] and r["t"] < end]  # not quota checks
    for r in requests:
        r["answered"] = not r["walled"]
    answered = [r["t"] for r in requests if r["answered"]]
    store = Store(layout.database)
    try:
        with store.transaction(write=False) as db:
            runs = [dict(row) for row in db.execute("SELECT * FROM runs ORDER BY id")]
            jobs = {row[0]: row[1] for row in db.execute("SELECT id, created_at FROM jobs")}
    finally:
        store.close()
    by_job: dict[int, list[dict[str, Any]]] = {}
    for run in runs:
        by_job.setdefault(run["job_id"], []).append(run)
    waits = [(since, how, "held for a reset") for since, how in at_resets]  # (since, how long, what)
    seen: list[float] = []  # when a CLI saw a wall
    for job, its in by_job.items():
        first_ones = job <= sessions  # submitted at once at the start, each placed behind the others' launches
        if (queued := its[0]["created_at"] - jobs[job]) > QUEUED and not first_ones:  # no room, not placing's time
            waits.append((jobs[job], queued, "a job queued"))
        for run, after in zip(its, [*its[1:], None], strict=True):
            held = run["state"] == "walled" and not (run["error"] or "").startswith("moved ")  # in flight, early
            if held and run["ended_at"] is not None:
                resumed = (after and (after["answered_at"] or after["ended_at"])) or time.time()
                waits.append((run["ended_at"], resumed - run["ended_at"], "a 429 seen"))
                seen.append(run["ended_at"])
    waits = [(since, min(how, end - since), what) for since, how, what in waits if since < end]
    seen = [t for t in seen if t < end]
    first, first_kind = min(((since, kind) for since, _, kind in waits), default=(None, None))
    times = [r["t"] for r in requests]
    with_room = sum(1 for t in seen if (i := bisect.bisect_right(times, t)) and requests[i - 1]["room"])
    runs = [r for r in runs if r["created_at"] < end]
    moves = [r for r in runs if r["prior_state"] in ("walled", "orphaned") and r["resume"]]
    early = sum(1 for r in runs if (r["error"] or "").startswith(MOVED_EARLY))
    cold = sum(1 for r in requests if r["cold"] and not r["walled"]) - len({r["job_id"] for r in runs})
    return Outcome(
        turns=len(answered),
        visible_429s=len(seen),
        visible_with_room=with_room,
        waited_hours=sum(how for _, how, _ in waits) * hours,
        moves_in_flight=counters.get("moves_in_flight", 0),
        early_moves=early,
        cold_tokens=sum(r["cache_creation_tokens"] for r in moves),
        cold_per_move=cold / len(moves) if moves else 0.0,
        first_wait_hours=(first - start) * hours if first is not None else None,
        first_wait=first_kind,
        turns_before_wait=sum(1 for t in answered if first is None or t < first),
        waits_for_reset=len(at_resets),
        unused_at_resets=resets.unused_before(requests, first),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 hours in 2 seconds instead of 3")
    parser.add_argument("--policies", default=",".join(POLICIES), help="which, comma-separated")
    parser.add_argument("--five-hour", type=float, help="seconds 5 hours last")
    parser.add_argument("--rounds", type=int, default=1, help="weeks per policy, the policies in turn each round")
    parser.add_argument("--sessions", type=int, default=SESSIONS, help="jobs kept going at once")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    five_hour = args.five_hour or (2.0 if args.quick else 3.0)
    print(
        f"a simulated week: 5 h = {five_hour:g} s, {len(ACCOUNTS)} accounts,"
        f" {args.sessions} sessions of {STEPS} requests ({LATENCY:g} s each),"
        f" budgets {round(FIVE_HOUR_RATE * five_hour)} per 5 h window"
        f" and {round(FIVE_HOUR_RATE * five_hour * WEEK * WEEK_SHARE)} per 7-day window"
    )
    outcomes: dict[str, list[Outcome]] = {policy: [] for policy in args.policies.split(",")}
    for round_ in range(1, args.rounds + 1):
        for policy, weeks in outcomes.items():
            with tempfile.TemporaryDirectory(prefix=f"cl-week-{policy}-") as tmp:
                weeks.append(simulate(policy, five_hour, args.sessions, Path(tmp)))
            print(f"  round {round_} {policy:15} {said(weeks[-1])}", flush=True)
    if args.rounds > 1:
        print("the median week of each (turns before the first wait decide):")
        for policy, weeks in outcomes.items():
            print(f"  {policy:15} {said(median(weeks))}")
    pace = median(outcomes["pace"]) if "pace" in outcomes else None
    peers = [median(weeks).turns_before_wait for policy, weeks in outcomes.items() if not policy.startswith("pace")]
    if pace is not None and peers:
        best = max(peers)
        gain = (pace.turns_before_wait / best - 1) * 100 if best else 0.0
        print(f"goals for pace: 429s seen with room {pace.visible_with_room} (goal 0);"
              f" turns before the first wait {gain:+.0f}% against the best peer (goal +15%);"
              f" cold-cache requests per move {pace.cold_per_move:.2f} (goal <= 1)")  # fmt: skip
    if (headroom := median(outcomes["headroom"]) if "headroom" in outcomes else None) and headroom.turns_before_wait:
        unused = sum(headroom.unused_at_resets.values())
        most = unused / headroom.turns_before_wait * 100
        print(f"headroom left {unused} units of weekly budget unused at resets before its first wait:"
              f" +{most:.0f}% of its turns before it, what using the soonest reset first could add")  # fmt: skip
    if args.json:
        figures = {policy: [dataclasses.asdict(week) for week in weeks] for policy, weeks in outcomes.items()}
        args.json.write_text(json.dumps(figures, indent=2))


def median(weeks: list[Outcome]) -> Outcome:
    """The week whose turns before the first wait are the median of the policy's weeks."""
    return sorted(weeks, key=lambda week: week.turns_before_wait)[len(weeks) // 2]


def said(week: Outcome) -> str:
    first = f"{week.first_wait_hours:.1f} h ({week.first_wait})" if week.first_wait_hours is not None else "never"
    return (
        f"turns {week.turns:6}  429s seen {week.visible_429s:4} (with room {week.visible_with_room:3})"
        f"  waited {week.waited_hours:7.1f} h  moves {week.moves_in_flight:4} at walls + {week.early_moves:4} early"
        f"  cold {week.cold_tokens:6} tokens ({week.cold_per_move:.2f}/move)"
        f"  {week.waits_for_reset:3} waits for a reset"
        f"  first wait {first}, {week.turns_before_wait:6} turns before it"
        f"  ({sum(week.unused_at_resets.values())} units unused at resets before it:"
        f" {', '.join(f'{name} {units}' for name, units in sorted(week.unused_at_resets.items()))})"
    )


if __name__ == "__main__":
    main()
