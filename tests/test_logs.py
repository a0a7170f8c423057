"""Log lines: journald priority prefixes, one line per event, and no secret ever."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from cl import journal as journal_ids
from cl import logs, redact
from cl.credentials import Secret
from utils import DaemonProcess, Layout, Planted, oauth_credential, wait_until, write_credential


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


def test_a_field_with_no_value_is_left_out() -> None:
    out = io.StringIO()
    logs.configure(stream=out)
    line = render(out, session=None, job=7, error=None)
    assert "None" not in line
    assert line.rstrip().endswith("something happened job=7")


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


def journal_stream(path: Path) -> str:
    """`$JOURNAL_STREAM` naming the file at `path` (created), as systemd names the stream it connects."""
    path.touch()
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}"


def entries(journal: socket.socket) -> list[dict[str, str]]:
    """What was sent to a stand-in for journald's socket, each datagram parsed as its native
    protocol has it: `KEY=value` lines, or `KEY`, a 64-bit little-endian length and the bytes."""
    found = []
    with contextlib.suppress(BlockingIOError):
        while True:
            data, entry = journal.recv(1 << 20, socket.MSG_DONTWAIT), {}
            while data:
                line, _, rest = data.partition(b"\n")
                if b"=" in line:
                    key, _, text = line.partition(b"=")
                    entry[key.decode()], data = text.decode(), rest
                else:
                    size = int.from_bytes(rest[:8], "little")
                    entry[line.decode()], data = rest[8 : 8 + size].decode(), rest[9 + size :]
            found.append(entry)
    return found


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket where journald's would be."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "journal.socket"))
        yield sock


def test_under_systemd_each_field_is_a_journal_field(
    tmp_path: Path, journal: socket.socket, planted: Planted, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream(tmp_path / "stream"))
    secret = Secret(planted.token())
    with (tmp_path / "stream").open("w") as stream:
        logs.configure("info", stream, journal_socket=journal.getsockname(), identifier="cl-rescue")
        log = structlog.get_logger("t")
        log.warning("session walled", session="59f9", job=7, account="a1", resets=None, **{"from": "a0"})
        log.error("something odd", error=f"with {secret} in it", detail="two\nlines")
        log.info("account added", account="a4", state="ok")
        Path(journal.getsockname()).unlink()  # journald gone: the line goes to the stream instead
        log.info("account removed", account="a4")
    logs.configure("info", io.StringIO())  # closes the journal's socket
    structlog.reset_defaults()  # this process's later tests log as structlog does by default
    walled, odd, added = entries(journal)
    assert walled == {
        "MESSAGE": "session walled session=59f9 job=7 account=a1 from=a0",  # no reset known: no field
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "cl-rescue",
        "MESSAGE_ID": journal_ids.MESSAGE_IDS["session walled"],
        "SESSION": "59f9",
        "JOB": "7",
        "ACCOUNT": "a1",
        "FROM": "a0",
    }
    assert (odd["PRIORITY"], odd["DETAIL"]) == ("3", "two\nlines")
    assert "MESSAGE_ID" not in odd
    assert redact.MASK in odd["ERROR"]
    assert redact.MASK in odd["MESSAGE"]
    assert not planted.leaks(repr([walled, odd, added]), "the journal")
    assert added["MESSAGE_ID"] == journal_ids.MESSAGE_IDS["account added"]
    assert (tmp_path / "stream").read_text() == "<6>account removed account=a4\n"


def test_field_names_are_the_journals() -> None:
    assert [journal_ids.field_name(k) for k in ("account", "retry-in", "_pid", "message", "9lives")] == [
        "ACCOUNT",
        "RETRY_IN",
        "PID",
        "X_MESSAGE",
        "X_9LIVES",
    ]


def test_a_daemon_under_systemd_writes_to_the_journal_natively(
    layout: Layout, planted: Planted, journal: socket.socket
) -> None:
    write_credential(layout.credentials, "bad", "{nope")
    env = layout.env(JOURNAL_STREAM=journal_stream(layout.root / "rescue.log"), CL_JOURNAL_SOCKET=journal.getsockname())
    daemon = DaemonProcess("rescue", layout, env=env).start()
    write_credential(layout.credentials, "a4", oauth_credential(planted))
    wait_until(lambda: "a4" in daemon.file_states(), "a4 to show")
    assert daemon.stop() == 0
    sent = entries(journal)
    added = next(e for e in sent if e.get("MESSAGE_ID") == journal_ids.MESSAGE_IDS["account added"])
    assert (added["ACCOUNT"], added["PRIORITY"], added["SYSLOG_IDENTIFIER"]) == ("a4", "6", "cl-rescue")
    invalid = next(e for e in sent if e.get("MESSAGE_ID") == journal_ids.MESSAGE_IDS["account invalid"])
    assert (invalid["ACCOUNT"], invalid["PRIORITY"]) == ("bad", "4")
    assert invalid["REASON"].startswith("malformed JSON")
    assert {e["MESSAGE"].split()[0] for e in sent} >= {"starting", "ready", "stopped"}
    assert daemon.log() == ""  # nothing on the stream: all of it went to the journal


def test_a_daemon_under_journald_without_its_socket_prefixes_priorities(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "bad", "{nope")
    log_path = layout.root / "journal.log"
    with log_path.open("w") as stream:
        st = os.fstat(stream.fileno())
    env = layout.env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", CL_JOURNAL_SOCKET="")
    daemon = DaemonProcess("rescue", layout, env=env)
    daemon.log_path = log_path
    daemon.start()
    write_credential(layout.credentials, "a4", oauth_credential(planted))
    wait_until(lambda: "a4" in daemon.file_states(), "a4 to show")
    assert daemon.stop() == 0
    lines = log_path.read_text().splitlines()
    assert "<6>account added account=a4 state=ok kind=oauth daemon=rescue" in lines
    assert any(line.startswith("<4>account invalid account=bad state=invalid reason=") for line in lines)
    assert all(line[:3] in {"<7>", "<6>", "<4>", "<3>"} for line in lines), lines
