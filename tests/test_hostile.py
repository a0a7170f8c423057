"""Hostile clients on the control sockets: fuzzed bytes and requests, 1,000 at once, memory bounded.

Every reply is either a success or an error with a precise code; never `internal`, never a crash,
never a reply lost. The daemons' memory after a second round of abuse is what it was after the
first: nothing accumulates per client or per bad request.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils import (
    DaemonProcess,
    Layout,
    Planted,
    both,
    cl,
    exchange_raw,
    history,
    job_state_set,
    job_states,
    live_runs,
    oauth_credential,
    proc_status,
    stored,
    submit,
    wait_until,
    write_credential,
)

EXPECTED_ERRORS = {"bad-json", "bad-request", "unknown-request", "too-long", "not-found", "finished", "refused"}
REQUESTS = ["accounts", "submit", "cancel", "status", "logs", "run-changed", "waiting", "nope", ""]

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(["cwd", "prompt", "job", "run", "session", "offset", "names", "model", "max_turns", "event"])
REQUEST = st.builds(
    lambda name, fields: {"request": name, **fields},
    st.sampled_from(REQUESTS) | JSON,
    st.dictionaries(FIELDS, JSON | st.just("/tmp") | st.integers(min_value=-1, max_value=3), max_size=4),
)
LINE = st.one_of(
    REQUEST.map(lambda r: json.dumps(r).encode()),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ")),
)


def well_answered(reply: dict[str, Any]) -> bool:
    return reply.get("ok") is True or (reply.get("ok") is False and reply.get("code") in EXPECTED_ERRORS)


def rss_kib(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0])


async def many_clients(path: Path, count: int) -> list[dict[str, Any]]:
    async def one(i: int) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(path))
        request = {"request": "accounts"} if i % 2 else {"request": "cancel", "job": i}
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        reply: dict[str, Any] = json.loads(await reader.readline())
        writer.close()
        await writer.wait_closed()
        return reply

    return await asyncio.gather(*(one(i) for i in range(count)))


def abuse(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    """One round: fuzzed lines to both daemons, then 1,000 clients at once on each."""

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(LINE.filter(lambda line: line.strip() != b""), min_size=1, max_size=5))
    def fuzz(lines: list[bytes]) -> None:
        for daemon in daemons:
            replies = exchange_raw(daemon.socket, b"".join(line + b"\n" for line in lines))
            assert len(replies) == len(lines)
            bad = [reply for reply in replies if not well_answered(reply)]
            assert not bad, bad

    fuzz()
    for daemon in daemons:
        replies = asyncio.run(many_clients(daemon.socket, 1000))
        assert len(replies) == 1000
        assert all(well_answered(reply) for reply in replies)


def test_fuzzed_requests_and_a_thousand_clients_get_precise_answers_in_bounded_memory(
    daemons: tuple[DaemonProcess, DaemonProcess],
) -> None:
    abuse(daemons)
    after_first = {daemon.name: rss_kib(daemon.pid) for daemon in daemons}
    abuse(daemons)
    for daemon in daemons:
        assert daemon.answers()
        grown = rss_kib(daemon.pid) - after_first[daemon.name]
        assert grown < 8 * 1024, f"cl-{daemon.name} grew by {grown} KiB over a second round"
        assert "request failed" not in daemon.log()  # no handler raised: nothing became `internal`


STRING_FIELDS = {
    "accounts": ["names"],
    "submit": ["cwd", "prompt", "model"],
    "cancel": ["job"],
    "logs": ["session", "job"],
    "run-changed": ["event", "run"],
    "waiting": [],
    "status": [],
}
HOSTILE_STRINGS = [chr(code) for code in [*range(32), 127]] + ["\ud800"]
HUGE = [2**63, 2**64, -(2**64)]


def test_control_characters_and_huge_numbers_in_every_field_get_precise_answers(
    daemons: tuple[DaemonProcess, DaemonProcess],
) -> None:
    """A NUL or any other control character (or a lone surrogate) in every string field of every
    request, 2**64 in every number, a 5,000-digit number: each gets a reply with a precise code (or
    success, where the value is only looked up), and both daemons live on."""
    lines = []
    for name, fields in STRING_FIELDS.items():
        base = {"request": name, "cwd": "/srv", "prompt": "x", "job": 1, "run": 1}
        for field in fields:
            for bad in HOSTILE_STRINGS:
                value: Any = [f"a{bad}b"] if field == "names" else f"/srv/a{bad}b"
                lines.append(json.dumps({**base, field: value}).encode())
        lines += [json.dumps({**base, field: huge}).encode() for field in ("job", "run", "max_turns") for huge in HUGE]
        lines.append(json.dumps({**base, "request": f"{name}\x00"}).encode())
    lines += [
        b'{"request": "cancel", "job": ' + b"9" * 5000 + b"}",
        b'{"request": "logs", "offset": ' + b"7" * 5000 + b"}",
    ]
    for daemon in daemons:
        replies = exchange_raw(daemon.socket, b"".join(line + b"\n" for line in lines))
        assert len(replies) == len(lines)  # one reply each, the connection kept
        assert [reply for reply in replies if not well_answered(reply)] == []
        assert daemon.process is not None
        assert daemon.process.poll() is None


def test_control_characters_in_everything_the_cli_prints_harm_nothing(layout: Layout, planted: Planted) -> None:
    """A NUL (and every other control character) in the session id, the model, the texts, the
    result: the session id is not taken (it is no UUID), the job still ends, and after a restart
    both daemons start and answer (a NUL in a stored session id once stopped cl-rescue's start)."""
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    env = layout.env(FAKE_CLAUDE_CONTROL="1")
    with both(layout, env=env):
        submit(layout, "print strange things")
        wait_until(lambda: job_state_set(layout) <= {"done", "failed"} and job_state_set(layout) != set(), "the end")
        (job,) = history(layout)["jobs"]
    assert job["session_id"] is None
    assert job["state"] == "done" or job["error"], job
    with both(layout, env=env) as (balancer, rescue):
        assert balancer.file_states() == rescue.file_states() == {"a1": "ok"}
    for daemon in (balancer, rescue):  # what the CLI printed reaches no log raw (a terminal's escapes)
        assert not set(daemon.log()) & (set(map(chr, range(32))) - {"\n"}), daemon.name


def test_a_gigabyte_line_without_a_newline_does_not_take_the_worker_with_it(layout: Layout, planted: Planted) -> None:
    """A CLI prints 1 GiB with no line break, then answers. The worker keeps a bounded part of a
    line (the rest is dropped and said in the run's log) and of what waits to be read, so its
    memory stays small; the answer after it still counts."""
    gate = layout.root / "gate"
    script = layout.root / "flood"
    result = json.dumps({"type": "result", "subtype": "success", "is_error": False, "result": "still here"})
    script.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && exec echo "2.1.332 (flood)"\nread line\n'  # as any CLI answers
        'echo \'{"type":"system","subtype":"init","session_id":"3f1d2c4b-5a69-4788-9abc-def012345678"}\'\n'
        f"head -c 1073741824 /dev/zero\necho\ntouch {gate}.flooded\nwhile [ -e {gate} ]; do sleep 0.05; done\n"
        f"echo '{result}'\n"
    )
    script.chmod(0o755)
    gate.touch()
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    with both(layout, env=layout.env(CL_CLAUDE_BIN=str(script))):
        job = submit(layout, "flood")
        wait_until(Path(f"{gate}.flooded").exists, "the CLI to print its gigabyte", timeout=300)
        (run,) = live_runs(layout)
        assert run.pid is not None
        peak = proc_status(run.pid)["VmHWM"]
        gate.unlink()
        wait_until(lambda: job_states(layout).get(job) == "done", "the answer after the flood to count")
    assert int(peak.split()[0]) < 300 * 1024, peak  # kB: a few lines' worth, not the gigabyte
    log = (layout.state / "logs" / f"job-{job}-run-{run.id}.log").read_text(errors="replace")
    assert "[cl: a line of the CLI's output longer than" in log


SESSION = "3f1d2c4b-5a69-4788-9abc-def012345678"


def shell_cli(path: Path, *steps: str) -> Path:
    """A CLI as a shell script: it reads its prompt, runs `steps`, says it is session `SESSION`
    (every run of it) and answers."""
    init = json.dumps({"type": "system", "subtype": "init", "session_id": SESSION})
    answer = json.dumps({"type": "result", "subtype": "success", "is_error": False, "result": "ok"})
    path.write_text(
        "#!/bin/sh\nread line\n" + "".join(f"{step}\n" for step in steps) + f"echo '{init}'\necho '{answer}'\n"
    )
    path.chmod(0o755)
    return path


def test_a_directory_planted_where_the_credential_goes_is_set_aside(layout: Layout, planted: Planted) -> None:
    """The CLI makes its `.credentials.json` a directory: the worker's next copy sets it aside
    (and says so) instead of dying on it, run after run."""
    script = shell_cli(
        layout.root / "plant", 'cd "$CLAUDE_CONFIG_DIR"', "rm -f .credentials.json", "mkdir .credentials.json"
    )
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    with both(layout, env=layout.env(CL_CLAUDE_BIN=str(script))) as (balancer, _rescue):
        job = submit(layout, "plant")
        wait_until(lambda: job_states(layout).get(job) == "done", "the job to end well")
    assert "something not a file stood where the CLI's credential goes, set aside" in balancer.log()
    config_dir = layout.sessions / f"job-{job}"
    assert (config_dir / ".credentials.json").is_file()
    assert [p.name.startswith(".credentials.json.not-a-file-") for p in config_dir.iterdir() if p.is_dir()] == [True]


def test_walls_without_end_fail_the_job_after_max_moves_per_hour(layout: Layout, planted: Planted) -> None:
    """Every request walls, each wall resets a second later (what a CLI faking walls could print in
    direct mode): the session moves `max_moves_per_hour` times, then its job fails with that reason
    rather than making runs without end."""
    layout.quota({"*": 0})
    for name in ("a1", "a2"):
        write_credential(layout.credentials, name, oauth_credential(planted))
    env = layout.env(FAKE_CLAUDE_RESET_IN="1", CL_WALL_RETRY="1", CL_RESET_JITTER="0.1", CL_MAX_MOVES_PER_HOUR="3")
    with both(layout, env=env) as (_balancer, rescue):
        job = submit(layout, "wall forever")
        wait_until(lambda: job_states(layout).get(job) == "failed", "the job to be given up", timeout=60)
        story = json.loads(cl(layout, "job", str(job), "--json").stdout)
    assert story["job"]["error"] == "moved 3 times in the last hour (max_moves_per_hour = 3)"
    assert len(story["moves"]) == 3
    assert "session given up" in rescue.log()


@pytest.mark.parametrize("said", ["moved early: a1 at 1% of 5h, resets in 1m", "Moved early: a1 at 1% of 5h"])
def test_a_wall_disguised_as_an_early_move_is_shown_as_the_wall_it_was(
    layout: Layout, planted: Planted, said: str
) -> None:
    """A CLI walled on a1 whose wall text reads like cl's own reason for an early move: its session
    moves as after any wall, `cl job` says it was walled, and the dashboard's timeline has the wall."""
    first = planted.token()
    layout.quota({first: 0})
    write_credential(layout.credentials, "a1", oauth_credential(planted, token=first))
    write_credential(layout.credentials, "a2", oauth_credential(planted))
    with both(layout, env=layout.env(FAKE_CLAUDE_WALL_SAYS=said)):
        job = submit(layout, "hi")
        wait_until(lambda: job_states(layout).get(job) == "done", "the job to finish on a2")
        story = json.loads(cl(layout, "job", str(job), "--json").stdout)
    (move,) = story["moves"]
    assert (move["from"], move["to"], move["why"]) == ("a1", "a2", "walled")
    walls = [event["account"] for event in stored(layout, lambda store: store.events(0)) if event["kind"] == "wall"]
    assert walls == ["a1"]


def test_a_worker_that_dies_again_and_again_fails_its_job_after_max_orphanings(
    layout: Layout, planted: Planted
) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    layout.hold.touch()  # every run's CLI waits: its worker is there to be killed
    with both(layout, env=layout.env(CL_MAX_ORPHANINGS="2")) as (_balancer, rescue):
        job = submit(layout, "die")
        for _ in range(2):
            (run,) = wait_until(lambda: [r for r in live_runs(layout) if r.pid], "a worker to run the job")
            assert run.pid is not None
            os.kill(run.pid, signal.SIGKILL)
            gone = run.id
            wait_until(lambda: gone not in {r.id for r in live_runs(layout)}, "the run to be found orphaned")  # noqa: B023
        wait_until(lambda: job_states(layout).get(job) == "failed", "the job to be given up")
        story = json.loads(cl(layout, "job", str(job), "--json").stdout)
    layout.hold.unlink()
    assert story["job"]["error"] == "its worker vanished 2 times (max_orphanings = 2)"
    assert "session given up" in rescue.log()


def test_a_session_id_belongs_to_the_first_job_that_reported_it(layout: Layout, planted: Planted) -> None:
    """Every run of this CLI says it is the same session: the second job's claim is not taken."""
    script = shell_cli(layout.root / "same-session")
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    with both(layout, env=layout.env(CL_CLAUDE_BIN=str(script))) as (balancer, _rescue):
        first = submit(layout, "one")
        wait_until(lambda: job_states(layout).get(first) == "done", "the first job")
        second = submit(layout, "two")
        wait_until(lambda: job_states(layout).get(second) == "done", "the second job")
        jobs = {job["id"]: job for job in json.loads(cl(layout, "jobs", "--all", "--json").stdout)}
    assert (jobs[first]["session_id"], jobs[second]["session_id"]) == (SESSION, None)
    assert "the CLI reported another job's session id, not taken" in balancer.log()


def test_a_cli_that_dies_without_a_result_leaves_its_last_stderr_lines_in_the_reason(
    layout: Layout, planted: Planted
) -> None:
    token = planted.token()
    script = layout.root / "bin" / "crashes"
    script.parent.mkdir()
    script.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && exec echo "2.1.332 (crashes)"\nread line\n'
        "echo 'Traceback (most recent call last):' >&2\n"
        'for n in 1 2 3 4 5 6; do echo "  File \\"/x.js\\", line $n, in turn" >&2; done\n'
        f"echo 'Error: the model is on fire (key {token})' >&2\nexit 1\n"
    )
    script.chmod(0o755)
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    with both(layout, env=layout.env(CL_CLAUDE_BIN=str(script), CL_CLI_READABLE=str(script.parent))):
        job = submit(layout, "crash")
        wait_until(lambda: job_states(layout).get(job) == "failed", "the job to fail")
        story = cl(layout, "job", str(job)).stdout
        listed = cl(layout, "jobs", "--all").stdout
    said = "exited with 1 without a result: no output; its stderr ended: "
    assert said in story, story
    assert 'File "/x.js", line 6, in turn | Error: the model is on fire (key ' in story  # the last 5 lines
    assert "line 1, in turn" not in story
    assert "without a result: no output; its stderr ended:" in listed
    assert not planted.leaks(story + listed, "the failure's reason")
