"""`cl accounts` against real daemons: views side by side, differences loud, exit codes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess

import pytest

from cl.cli import parser, readable
from utils import (
    BIN,
    REPO,
    DaemonProcess,
    Layout,
    Planted,
    both,
    cl,
    interruptible,
    job_states,
    oauth_credential,
    wait_until,
    write_credential,
)


def test_both_views_side_by_side(
    layout: Layout, planted: Planted, daemons: tuple[DaemonProcess, DaemonProcess]
) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    write_credential(layout.credentials, "zz", "not json")
    wait_until(lambda: all(len(d.file_states()) == 2 for d in daemons), "both daemons to see both files")
    result = cl(layout, "accounts")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ACCOUNT", "STATE", "KIND", "EXPIRES", "5H", "7D", "SETTINGS", "REASON"]
    a1, zz = lines[1].split(), lines[2].split()
    assert a1[:4] == ["a1", "ok", "oauth", "in"]  # its token expires in some hours
    assert a1[5:] == ["-", "-", "-"]  # no window read yet, no setting, no reason
    assert zz[:2] == ["zz", "invalid"]
    assert "malformed JSON" in lines[2]

    as_json = json.loads(cl(layout, "accounts", "--json").stdout)
    assert set(as_json) == {"accounts", "balancer", "rescue", "ignored", "fleet"}
    assert as_json["balancer"] == as_json["rescue"]
    assert [(a["name"], a["file"]) for a in as_json["balancer"]] == [("a1", "ok"), ("zz", "invalid")]
    assert [(a["name"], a["state"], a["kind"]) for a in as_json["accounts"]] == [
        ("a1", "ok", "oauth"),
        ("zz", "invalid", None),
    ]

    only = json.loads(cl(layout, "accounts", "--from", "rescue", "--json").stdout)
    assert only == as_json["rescue"]
    table = cl(layout, "accounts", "--from", "balancer").stdout
    assert table.splitlines()[0].split() == ["ACCOUNT", "FILE", "KIND", "EXPIRES", "REASON"]


def test_differing_views_are_loud(layout: Layout, planted: Planted) -> None:
    # Two daemons pointed at different directories: the situation `cl accounts` must catch.
    write_credential(layout.credentials, "a", oauth_credential(planted))
    other = layout.root / "other"
    other.mkdir()
    write_credential(other, "b", oauth_credential(planted))
    balancer = DaemonProcess("balancer", layout).start()
    rescue = DaemonProcess("rescue", layout, env=layout.env(CL_CREDENTIALS_DIR=str(other))).start()
    try:
        result = cl(layout, "accounts")
        assert result.returncode == 1
        assert "different accounts" in result.stderr
        assert "a: only cl-balancer sees it" in result.stderr
        assert "b: only cl-rescue sees it" in result.stderr
    finally:
        balancer.stop()
        rescue.stop()


def test_unreachable_daemon_exits_3(layout: Layout) -> None:
    balancer = DaemonProcess("balancer", layout).start()
    try:
        result = cl(layout, "accounts")
        assert result.returncode == 3
        assert "cl-rescue is unreachable" in result.stderr
        assert cl(layout, "accounts", "--from", "balancer").returncode == 0
    finally:
        balancer.stop()


def test_usage_and_configuration_errors_exit_2(layout: Layout) -> None:
    assert cl(layout, "accounts", "--from", "nobody").returncode == 2
    result = subprocess.run(
        [str(BIN / "cl"), "accounts"],
        env=layout.env(CL_RUNTIME_DIR=""),  # the one setting the command line reads (a daemon's cannot break it)
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "CL_RUNTIME_DIR" in result.stderr


@pytest.mark.usefixtures("daemons")
def test_the_command_line_is_a_good_unix_citizen(layout: Layout, planted: Planted) -> None:
    """`--version`; a stray `CL_*` variable or a daemon's bad setting does not break it; a reader
    that goes away (`| head`) and Ctrl-C end it quietly; a file given as `--cwd` is said to be one."""
    version = cl(layout, "--version")
    assert (version.returncode, version.stdout.strip()) == (0, "cl 0.1.0")
    assert cl(layout, "status", CL_FOO="1", CL_WATCH_STEP_MS="not a number").returncode == 0

    reader_gone = subprocess.Popen(
        [str(BIN / "cl"), "accounts"], env=layout.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert reader_gone.stdout is not None
    reader_gone.stdout.close()  # before it writes a line
    _, err = reader_gone.communicate(timeout=60)
    assert (reader_gone.returncode, err) == (-signal.SIGPIPE, b"")

    write_credential(layout.credentials, "a1", oauth_credential(planted))
    layout.hold.touch()  # the session runs on: `cl logs -f` follows it
    try:
        job = cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "long", "--json")
        wait_until(layout.claude_calls, "the session to start")
        follow = subprocess.Popen(
            [str(BIN / "cl"), "logs", "-f", str(json.loads(job.stdout)["job"])],
            env=layout.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=interruptible,  # noqa: PLW1509 - no threads in that child
        )
        assert follow.stdout is not None
        assert follow.stdout.readline()  # it is following
        follow.send_signal(signal.SIGINT)
        _, err = follow.communicate(timeout=60)
        assert (follow.returncode, err) == (130, b"")
    finally:
        layout.hold.unlink()

    not_a_directory = cl(layout, "submit", "--cwd", str(layout.root / "config.toml"), "--prompt", "x")
    assert (not_a_directory.returncode, not_a_directory.stderr.strip()) == (
        2,
        f"cl: --cwd {layout.root / 'config.toml'}: not a directory",
    )


def test_submit_defaults_to_here_and_wait_result_and_state_say_precisely(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    layout.hold.touch()  # the job runs on
    with both(layout):
        submitted = subprocess.run(
            [str(BIN / "cl"), "submit", "--prompt", "here", "--json"],
            env=layout.env(), cwd=layout.work, capture_output=True, text=True, check=False,
        )  # fmt: skip
        job = json.loads(submitted.stdout)["job"]
        assert json.loads(cl(layout, "job", str(job), "--json").stdout)["job"]["cwd"] == str(layout.work)
        wait_until(layout.claude_calls, "the session to start")
        waited = cl(layout, "wait", str(job), "--timeout", "0.2")
        assert (waited.returncode, waited.stderr) == (7, f"cl: job {job} is still running after 0.2 s\n")
        early = cl(layout, "result", str(job))
        assert (early.returncode, early.stderr) == (4, f"cl: job {job} has no result yet (running)\n")
        assert cl(layout, "cancel", str(job)).returncode == 0
        wait_until(lambda: job_states(layout)[job] == "cancelled", "the job to be cancelled")
        cancelled = cl(layout, "result", str(job))
        assert cancelled.returncode == 6
        assert cancelled.stderr.startswith(f"cl: job {job} cancelled")
        typo = cl(layout, "sessions", "--state", "nonsense")
        assert typo.returncode == 2
        assert "invalid choice: 'nonsense'" in typo.stderr
    layout.hold.unlink()


def test_every_option_has_help_and_every_command_examples() -> None:
    """What `cl COMMAND --help` shows a newcomer: no option without words, no command without an example."""
    top = parser()
    (commands,) = [action for action in top._actions if isinstance(action, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        assert command.epilog is not None, name
        assert command.epilog.startswith("examples:\n  cl "), name
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"cl {name}: {action.dest} has no help"


@pytest.mark.usefixtures("daemons")
def test_jobs_and_sessions_show_live_work_unless_asked_for_more(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    done = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "quick", "--json").stdout)["job"]
    wait_until(lambda: json.loads(cl(layout, "jobs", "--all", "--json").stdout)[0]["state"] == "done", "done")

    def ids(*args: str) -> list[int]:
        result = cl(layout, "jobs", *args, "--json")
        assert result.returncode == 0, result.stderr
        return [job["id"] for job in json.loads(result.stdout)]

    assert ids() == []  # live work only
    assert ids("--all") == ids("--state", "done") == ids("--all", "--since", "1h") == [done]
    assert ids("--all", "--since", "2099-01-01T00:00:00Z") == []
    assert cl(layout, "jobs", "--since", "yesterday").returncode == 2
    assert [s["job"] for s in json.loads(cl(layout, "sessions", "--all", "--json").stdout)] == [done]


def test_the_stream_reads_as_text() -> None:
    """`cl logs`: the answer's text, a tool call on one line, a wall marked, the end said; `--raw` is the stream."""
    tool = {"type": "tool_use", "name": "Bash", "input": {"command": "make test"}}
    assert (
        readable(json.dumps({"type": "assistant", "message": {"content": [tool]}})) == '→ Bash {"command": "make test"}'
    )
    wall = {"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "resetsAt": 1796140800}}
    assert readable(json.dumps(wall)) == "⚠ usage wall until 2026-12-01 16:00Z"
    assert readable(json.dumps({"type": "rate_limit_event", "rate_limit_info": {"status": "allowed"}})) is None
    failed = {"type": "result", "is_error": True, "errors": ["No conversation found with session ID: x"]}
    assert readable(json.dumps(failed)) == "── error: No conversation found with session ID: x"
    assert readable("Not logged in · Please run /login") == "Not logged in · Please run /login"


def test_status_watch_shows_it_again_until_ctrl_c(
    layout: Layout, planted: Planted, daemons: tuple[DaemonProcess, DaemonProcess]
) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    wait_until(lambda: all(d.file_states() == {"a1": "ok"} for d in daemons), "both daemons to see a1")
    watching = subprocess.Popen(
        [str(BIN / "cl"), "status", "--watch", "0.2"],
        env=layout.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,  # noqa: PLW1509 - no threads in that child
    )
    assert watching.stdout is not None
    seen: list[str] = []
    for line in iter(watching.stdout.readline, ""):
        seen += [line] if line.startswith("0 job(s) queued") else []
        if len(seen) == 3:  # the same view, three times over
            break
    watching.send_signal(signal.SIGINT)
    _out, err = watching.communicate(timeout=20)
    assert (watching.returncode, err) == (130, "")
    assert len(seen) == 3


@pytest.mark.usefixtures("daemons")
def test_tables_show_short_session_ids_and_say_what_they_hide(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    done = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "hi", "--json").stdout)["job"]
    wait_until(lambda: job_states(layout).get(done) == "done", "the job to be done")
    layout.hold.touch()  # the next one stays running
    running = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "stay", "--json").stdout)["job"]
    wait_until(lambda: len(layout.claude_calls()) == 2, "the second session to start")
    session = next(j for j in json.loads(cl(layout, "jobs", "--json").stdout) if j["id"] == running)["session_id"]
    listed = cl(layout, "jobs").stdout
    row = next(line.split() for line in listed.splitlines() if line.startswith(str(running)))
    assert row[3] == session[:8]
    assert listed.rstrip().endswith("1 finished job(s) not shown: cl jobs --all (or --state done, failed, cancelled)")
    wide = cl(layout, "jobs", "-o", "wide").stdout
    assert next(line.split() for line in wide.splitlines() if line.startswith(str(running)))[3] == session
    assert "not shown" not in cl(layout, "jobs", "--all").stdout
    assert session[:8] in cl(layout, "sessions").stdout
    assert session not in cl(layout, "sessions").stdout
    assert session in cl(layout, "sessions", "-o", "wide").stdout
    assert cl(layout, "logs", session[:8]).returncode == 0  # what a table shows finds it
    layout.hold.unlink()


@pytest.mark.usefixtures("daemons")
def test_bash_completes_job_ids_and_account_names_from_the_daemons(layout: Layout, planted: Planted) -> None:
    for name in ("a1", "b2"):
        write_credential(layout.credentials, name, oauth_credential(planted))
    job = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "hi", "--json").stdout)["job"]
    wait_until(lambda: cl(layout, "complete", "accounts").stdout.split() == ["a1", "b2"], "both accounts listed")
    script = (
        f"source {REPO}/packaging/completion/cl; COMP_WORDS=(cl result ''); COMP_CWORD=2; _shtab_cl;"
        ' echo "${COMPREPLY[*]}"; COMP_WORDS=(cl accounts pause b); COMP_CWORD=3; _shtab_cl; echo "${COMPREPLY[*]}"'
    )
    env = {**layout.env(), "PATH": f"{BIN}:{os.environ['PATH']}"}
    shown = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True)
    assert shown.stdout.splitlines() == [str(job), "b2"], shown
