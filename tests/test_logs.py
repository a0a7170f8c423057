"""Log lines: journald priority prefixes, one line per event, and no secret ever."""

from __future__ import annotations

import contextlib
import io
import os
import pty
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import structlog

from cl import logs, redact
from cl.credentials import Secret
from utils import BIN, DaemonProcess, Layout, Planted, oauth_credential, wait_until, write_credential


def render(configure_stream: io.StringIO, emit: str = "info", **fields: object) -> str:
    getattr(structlog.get_logger("t"), emit)("something happened", **fields)
    return configure_stream.getvalue()


def test_journal_lines_carry_priority_and_fields() -> None:
    lines = [
        logs.journal_renderer(None, level, {"event": "account added", "level": level, "account": "a4", "why": "x y"})
        for level in ("debug", "info", "warning", "error", "critical")
    ]
    assert lines == [f'<{prio}>account added account=a4 why="x y"' for prio in (7, 6, 4, 3, 2)]
    multi = logs.journal_renderer(None, "error", {"event": "boom", "level": "error", "exception": "a\nb"})
    assert "\n" not in multi


def test_journald_is_detected_by_the_stream_identity_not_the_variable(tmp_path: Path) -> None:
    code = "import sys; from cl import logs; print(logs.under_journald(sys.stderr))"
    with (tmp_path / "err").open("w") as err:
        st = os.fstat(err.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        same = subprocess.run(
            [sys.executable, "-c", code],
            stderr=err,
            env=env,
            capture_output=False,
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"
        other = subprocess.run(
            [sys.executable, "-c", code], stderr=err, env=env, stdout=subprocess.PIPE, text=True, check=True
        )
    assert (same.stdout.strip(), other.stdout.strip()) == ("True", "False")


def test_redaction_of_every_known_secret_in_any_position(planted: Planted) -> None:
    stream = io.StringIO()
    logs.configure("debug", stream)
    shaped, plain = planted.token(), planted.token("plain-")
    Secret(plain)  # what the registry does for each token it reads
    log = structlog.get_logger("t")
    log.info(f"token {plain} in the event", field=plain, glued=f"key={plain}.", shaped=shaped)
    log.error("in a list", values=[plain, {"nested": shaped}])
    try:
        int(f"bad {plain}")
    except ValueError:
        log.exception("with a traceback")
    output = stream.getvalue()
    assert output.count(redact.MASK) >= 7
    assert not planted.leaks(output, "log")
    assert len(output.strip().splitlines()) >= 3


def test_secret_values_do_not_print(planted: Planted) -> None:
    secret = Secret(planted.token())
    assert not planted.leaks(f"{secret} {secret!r} {[secret]}", "formatting")


def test_a_daemon_under_journald_prefixes_priorities(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "bad", "{nope")
    log_path = layout.root / "journal.log"
    with log_path.open("w") as stream:
        st = os.fstat(stream.fileno())
    daemon = DaemonProcess("rescue", layout, env=layout.env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"))
    daemon.log_path = log_path
    daemon.start()
    write_credential(layout.credentials, "a4", oauth_credential(planted))
    wait_until(lambda: "a4" in daemon.states(), "a4 to show")
    assert daemon.stop() == 0
    lines = log_path.read_text().splitlines()
    assert "<6>account added account=a4 state=ok kind=oauth daemon=rescue" in lines
    assert any(line.startswith("<4>account added account=bad state=invalid reason=") for line in lines)
    assert all(line[:3] in {"<7>", "<6>", "<4>", "<3>"} for line in lines), lines


def test_a_daemon_on_a_terminal_writes_readable_lines(layout: Layout, planted: Planted) -> None:
    """stderr on a real pseudo-terminal: structlog's console lines, no priority prefixes, no secret."""
    terminal, daemon_side = pty.openpty()
    process = subprocess.Popen([str(BIN / "cl-rescue")], env=layout.env(), stderr=daemon_side, stdin=subprocess.DEVNULL)
    os.close(daemon_side)
    shown = bytearray()

    def read_terminal() -> None:
        with contextlib.suppress(OSError):  # EIO once the daemon closed its side
            while chunk := os.read(terminal, 65536):
                shown.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        wait_until(lambda: b"ready" in shown, "cl-rescue to say it is ready")
        write_credential(layout.credentials, "a4", oauth_credential(planted))
        wait_until(lambda: b"account added" in shown, "cl-rescue to tell of the new account")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        reader.join(20)
        os.close(terminal)
    text = re.sub(r"\x1b\[[0-9;]*m", "", shown.decode(errors="replace"))  # the colours
    assert re.search(r"^\S+ \[info\s*\] account added\s+account=a4 ", text, re.MULTILINE), text
    assert re.search(r"\[info\s*\] stopped", text), text
    assert not re.search(r"^<\d>", text, re.MULTILINE)
    assert not planted.leaks(text, "terminal")
