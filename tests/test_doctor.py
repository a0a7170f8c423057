"""`cl doctor`, and the same checks at the daemons' start: each problem with its fix, and work
that waits (never fails) while something stops every CLI from starting."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
from pathlib import Path

from cl.doctor import runnable_by, writable_by
from utils import (
    FAKE_CLAUDE,
    Layout,
    Planted,
    both,
    cl,
    job_states,
    oauth_credential,
    status,
    submit,
    wait_until,
    write_credential,
)


def test_runnable_by_reads_every_folder_on_the_way_and_the_file(reachable: Path) -> None:
    tmp_path = reachable
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    binary = closed / "claude"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    stranger = 54321
    assert f"{closed} (mode drwx------" in str(runnable_by(binary, stranger, [stranger]))
    closed.chmod(0o711)  # searchable, not listable: enough
    assert runnable_by(binary, stranger, [stranger]) is None
    binary.chmod(0o711)  # runnable, not readable: a script's interpreter cannot read it
    assert "does not let it read and run" in str(runnable_by(binary, stranger, [stranger]))
    shutil.chown(binary, group=0)
    binary.chmod(0o750)
    assert runnable_by(binary, stranger, [0]) is None  # by its group
    link = tmp_path / "link"
    link.symlink_to(binary)
    assert runnable_by(link, stranger, [stranger]) is not None  # followed, as exec does
    assert (
        runnable_by(tmp_path / "missing", stranger, [stranger]) == f"{tmp_path / 'missing'}: No such file or directory"
    )


def test_writable_by_finds_where_another_user_could_swap_the_cli(reachable: Path) -> None:
    binary = reachable / "claude"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    stranger = 54321
    assert writable_by(binary, stranger, [stranger]) is None
    reachable.chmod(0o777)  # it could put another file there
    assert writable_by(binary, stranger, [stranger]) == reachable
    reachable.chmod(0o1777)  # sticky: only the owner of a file may replace it
    assert writable_by(binary, stranger, [stranger]) is None
    os.chown(binary, stranger, stranger)
    assert writable_by(binary, stranger, [stranger]) == binary


def test_a_missing_claude_makes_work_wait_with_the_fix_and_a_reload_resumes_it(
    layout: Layout, planted: Planted
) -> None:
    later = layout.fakes / "bin" / "claude"  # where the CLI will be installed
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    with both(layout, env=layout.env(CL_CLAUDE_BIN=str(later))) as (balancer, rescue):
        job = submit(layout, "waits for claude")
        wait_until(lambda: status(layout)["blocked"], "the balancer to say what blocks work")
        shown = cl(layout, "status").stdout
        assert f"1 job(s) queued: work waits, no CLI can start: claude_bin: {later}" in shown, shown
        checked = cl(layout, "doctor")
        assert checked.returncode == 8, checked.stdout + checked.stderr
        row = next(line for line in checked.stdout.splitlines() if "claude_bin" in line)
        assert row.split()[:2] == ["FAIL", "claude_bin"]
        assert "(fix: install Claude Code where the CLI's users can run it" in row
        assert job_states(layout)[job] == "queued"  # waiting, not failed
        assert layout.claude_calls() == []
        later.parent.mkdir()
        shutil.copy(FAKE_CLAUDE, later)
        for daemon in (balancer, rescue):
            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGHUP)  # checked again at a reload (and every 30 s)
        wait_until(lambda: job_states(layout)[job] == "done", "the job to run once claude is there")
        assert status(layout)["blocked"] is None
        assert cl(layout, "doctor").returncode == 0
    log = balancer.log()
    assert log.count("work waits: a CLI cannot start") == 1  # said once while it lasted
    assert "work resumes: every check passes" in log


def test_doctor_names_each_file_it_skips_and_why(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    write_credential(layout.credentials, "bad", "{")
    (layout.credentials / "credential-x.json").write_text(oauth_credential(planted))
    (layout.credentials / "notes.txt").write_text("hello")
    with both(layout, env=layout.env(FAKE_CLAUDE_VERSION="9.9.9")):
        checked = cl(layout, "doctor", "--json")
        assert checked.returncode == 0, checked.stdout + checked.stderr  # warnings only
    said = json.loads(checked.stdout)
    assert said["checked_by"].startswith("cl-balancer, as ")
    lines = {(f["check"], f["said"]) for f in said["findings"] if not f["ok"]}
    assert ("claude version", "9.9.9 is not a version cl was tested with (2.1.332, 2.0.77, 1.0.128)") in lines
    assert ("credentials", "credentials-bad.json: invalid: malformed JSON (line 1, column 2)") in lines or any(
        said.startswith("credentials-bad.json: invalid: malformed JSON") for _, said in lines
    )
    assert (
        "credentials",
        "credential-x.json ignored: not a credential file's name: call it credentials-x.json",
    ) in lines
    assert ("credentials", "notes.txt ignored: not named credentials-NAME.json") in lines
    counted = next(f for f in said["findings"] if f["check"] == "credentials" and f["ok"])
    assert counted["said"] == f"2 account(s), 1 usable, in {layout.credentials}"
    assert not planted.leaks(checked.stdout, "cl doctor's output")


def test_doctor_without_the_daemons_checks_here_and_says_they_are_down(layout: Layout) -> None:
    checked = cl(layout, "doctor")
    assert checked.returncode == 8
    assert "(cl-balancer does not answer)" in checked.stdout
    assert next(line for line in checked.stdout.splitlines() if "cl-rescue" in line).startswith("FAIL")
    assert any(line.split()[:2] == ["ok", "claude_bin"] for line in checked.stdout.splitlines())


def test_a_credentials_directory_others_may_write_stops_work(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    layout.credentials.chmod(0o777)
    checked = cl(layout, "doctor", "--json")
    (problem,) = [f for f in json.loads(checked.stdout)["findings"] if f["check"] == "directories"]
    assert problem["blocks"]
    assert problem["fix"] == f"chmod go-w {layout.credentials}"
    mode = stat.filemode(layout.credentials.stat().st_mode)
    assert problem["said"] == f"credentials_dir {layout.credentials} is writable by others ({mode})"
