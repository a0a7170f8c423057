"""The CLI writes only beneath its job's cwd and config dir (and /tmp, /dev): not the state store,
not any account's credential file (a refresh lands in its config dir; the worker carries it back),
not anywhere else."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cl import landlock
from utils import DaemonProcess, Layout, Planted, cl, json_lines, oauth_credential, wait_until, write_credential


@pytest.fixture
def outside_tmp() -> Iterator[Layout]:
    """A layout under /var/tmp: /tmp is writable for the CLI, so the test must live elsewhere."""
    root = Path(tempfile.mkdtemp(prefix="cl-sandbox-", dir="/var/tmp"))
    try:
        yield Layout(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(not landlock.abi(), reason="this kernel has no Landlock")
def test_the_cli_writes_only_where_its_job_lives(outside_tmp: Layout, planted: Planted) -> None:
    layout = outside_tmp
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    write_credential(layout.credentials, "a2", oauth_credential(planted))
    (layout.state / "notes.txt").write_text("the daemons' own")
    targets = {
        "cwd": layout.work / "made-by-the-session.txt",
        "own credential": layout.credentials / "credentials-a1.json",
        "tmp": Path("/tmp") / f"cl-sandbox-{os.getpid()}.txt",
        "state store": layout.state / "cl.db",
        "state dir": layout.state / "notes.txt",
        "other credential": layout.credentials / "credentials-a2.json",
        "elsewhere": layout.root / "elsewhere.txt",
    }
    log = layout.root / "fake-claude.jsonl"
    log.touch()  # a `cli_writable` path must exist: the rule is on the file
    env = layout.env(
        FAKE_CLAUDE_TOUCH=":".join(str(path) for path in targets.values()),
        FAKE_CLAUDE_LOG=str(log),
        CL_CLI_WRITABLE=str(log),  # the fake's own log, outside every allowed place
        CL_MAX_SESSIONS_PER_ACCOUNT="1",
    )
    daemon = DaemonProcess("balancer", layout, env=env).start()
    try:
        submitted = cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "try to write", "--json")
        assert submitted.returncode == 0, submitted.stderr
        (call,) = wait_until(lambda: json_lines(log), "the CLI to run")
    finally:
        daemon.stop()
        targets["tmp"].unlink(missing_ok=True)
    account = "a1" if call["token_tail"] == planted.tokens[0][-6:] else "a2"
    if account == "a2":  # the job went to a2: the two credentials swap roles
        targets["own credential"], targets["other credential"] = targets["other credential"], targets["own credential"]
    could = {name: call["touched"][str(path)] for name, path in targets.items()}
    assert could == {
        "cwd": True,
        "own credential": False,
        "tmp": True,
        "state store": False,
        "state dir": False,
        "other credential": False,
        "elsewhere": False,
    }
