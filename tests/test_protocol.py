"""The control socket: every bad request gets a precise error reply and the daemon lives on."""

from __future__ import annotations

import json
import socket
import stat
from pathlib import Path

import pytest

from cl.protocol import MAX_REQUEST_BYTES
from utils import DaemonProcess


def exchange(path: Path, payload: bytes) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


@pytest.mark.parametrize(
    ("payload", "code", "message_part"),
    [
        (b"{nope\n", "bad-json", "not valid JSON"),
        (b"\xff\xfe\n", "bad-json", "not valid JSON"),
        (b"[1,2]\n", "bad-request", "JSON object"),
        (b'"accounts"\n', "bad-request", "JSON object"),
        (b"{}\n", "bad-request", '"request" field'),
        (b'{"request": 7}\n', "bad-request", '"request" field'),
        (b'{"request": "launch-missiles"}\n', "unknown-request", "known: accounts"),
        (b'{"request": "accounts", "names": "a"}\n', "bad-request", '"names" must be a list'),
        (b"[" * 50_000 + b"\n", "bad-json", "nested too deeply"),
    ],
)
def test_bad_requests_get_precise_errors(
    daemons: tuple[DaemonProcess, DaemonProcess], payload: bytes, code: str, message_part: str
) -> None:
    balancer, _ = daemons
    (reply,) = exchange(balancer.socket, payload)
    assert reply["ok"] is False
    assert reply["code"] == code
    assert message_part in str(reply["error"])
    assert balancer.answers()


def test_a_line_over_the_limit_is_refused_and_the_daemon_lives(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    balancer, _ = daemons
    (reply,) = exchange(balancer.socket, b'{"request": "' + b"x" * MAX_REQUEST_BYTES + b'"}\n')
    assert (reply["ok"], reply["code"]) == (False, "too-long")
    assert balancer.answers()


def test_many_requests_on_one_connection_and_blank_lines(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    balancer, _ = daemons
    replies = exchange(balancer.socket, b'{"request": "accounts"}\n\n{oops\n{"request": "accounts"}\n')
    assert [reply["ok"] for reply in replies] == [True, False, True]


def test_half_closed_and_silent_clients_do_not_hurt(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    balancer, _ = daemons
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(balancer.socket))
    (reply,) = exchange(balancer.socket, b'{"request": "acc')  # cut off, then EOF
    assert (reply["ok"], reply["code"]) == (False, "bad-json")
    assert balancer.answers()
    silent.close()


def test_socket_mode_is_0660(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    for daemon in daemons:
        assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660
