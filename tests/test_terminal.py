"""At a real pseudo-terminal, as a person runs things: Ctrl-C, `| head`, a daemon's colours and
NO_COLOR. The command's controlling terminal is the pty, so Ctrl-C is the byte, not a signal we send."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

from utils import (
    BIN,
    REPO,
    Layout,
    Planted,
    Terminal,
    both,
    oauth_credential,
    submit,
    wait_until,
    write_credential,
)

COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def test_ctrl_c_ends_a_followed_log_quietly(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    with both(layout):
        layout.hold.touch()  # the session runs on: `cl logs -f` follows it
        try:
            job = submit(layout, "long")
            wait_until(layout.claude_calls, "the session to start")
            follow = Terminal([str(BIN / "cl"), "logs", "-f", str(job)], layout.env())
            wait_until(lambda: "── session" in follow.text(), "the follower to print the session's start")
            follow.ctrl_c()
            assert follow.wait() == 130
        finally:
            layout.hold.unlink()
    assert "Traceback" not in follow.text()
    assert "KeyboardInterrupt" not in follow.text()


def test_a_pipe_into_head_ends_quietly(layout: Layout, planted: Planted) -> None:
    credential = oauth_credential(planted)
    for n in range(2000):  # a table far larger than a pipe holds: `cl` is still writing when head goes
        write_credential(layout.credentials, f"a{n:04}", credential)
    with both(layout) as (balancer, _rescue):
        wait_until(lambda: len(balancer.file_states()) == 2000, "both daemons to see every account")
        shell = Terminal(["sh", "-c", f"{BIN / 'cl'} accounts | head -1; echo exit=$?"], layout.env())
        assert shell.wait() == 0
    assert shell.text().split("\n")[1:] == ["exit=0", ""]
    assert shell.text().split()[:8] == ["ACCOUNT", "STATE", "KIND", "EXPIRES", "5H", "7D", "SETTINGS", "REASON"]


def test_a_daemon_at_a_terminal_writes_readable_lines_in_colour_unless_no_color(
    layout: Layout, planted: Planted
) -> None:
    """structlog's console lines, no priority prefixes, no secret; colours unless NO_COLOR is set."""
    shown = {}
    for no_color in ("", "1"):
        rescue = Terminal([str(BIN / "cl-rescue")], layout.env(NO_COLOR=no_color))
        wait_until(lambda r=rescue: "ready" in COLOUR.sub("", r.text()), "cl-rescue to say it is ready")  # type: ignore[misc]
        write_credential(layout.credentials, f"a{no_color or 0}", oauth_credential(planted))
        wait_until(lambda r=rescue: "account added" in COLOUR.sub("", r.text()), "the new account")  # type: ignore[misc]
        rescue.process.send_signal(signal.SIGTERM)
        assert rescue.wait() == 0
        shown[no_color] = rescue.text()
    assert COLOUR.search(shown[""])
    assert not COLOUR.search(shown["1"])
    text = COLOUR.sub("", shown[""])
    assert re.search(r"^\S+ \[info\s*\] account added\s+account=a0 ", text, re.MULTILINE), text
    assert re.search(r"\[info\s*\] stopped", text), text
    assert not re.search(r"^<\d>", text, re.MULTILINE)
    assert not planted.leaks(shown[""] + shown["1"], "terminal")


def test_ctrl_c_works_in_a_test_run_started_with_sigint_ignored() -> None:
    """`make test` as a shell's background job (SIGINT ignored, and every child inherits that):
    the tests that interrupt a command still pass, each restoring SIGINT in the child it starts."""
    tests = [f"{__file__}::test_ctrl_c_ends_a_followed_log_quietly", "tests/test_make_run.py"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *tests],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:]
