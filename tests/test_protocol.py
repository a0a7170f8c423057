"""The control socket: every bad request gets a precise error reply and the daemon lives on."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from cl import protocol
from cl.protocol import MAX_REQUEST_BYTES
from utils import DaemonProcess, Layout, exchange_raw


@pytest.mark.parametrize(
    ("payload", "code", "message_part"),
    [
        (b"{nope\n", "bad-json", "not valid JSON"),
        (b"\xff\xfe\n", "bad-json", "not valid JSON"),
        (b"[1,2]\n", "bad-request", "JSON object"),
        (b'"accounts"\n', "bad-request", "JSON object"),
        (b"{}\n", "bad-request", '"request" field'),
        (b'{"request": 7}\n', "bad-request", '"request" field'),
        (b'{"request": "launch-missiles"}\n', "unknown-request", "known: account, accounts, cancel"),
        (b'{"request": "accounts", "names": "a"}\n', "bad-request", '"names" must be a list'),
        (b"[" * 50_000 + b"\n", "bad-json", "nested too deeply"),
    ],
)
def test_bad_requests_get_precise_errors(
    daemons: tuple[DaemonProcess, DaemonProcess], payload: bytes, code: str, message_part: str
) -> None:
    balancer, _ = daemons
    (reply,) = exchange_raw(balancer.socket, payload)
    assert reply["ok"] is False
    assert reply["code"] == code
    assert message_part in str(reply["error"])
    assert balancer.answers()


def test_a_line_over_the_limit_is_refused_and_the_daemon_lives(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    balancer, _ = daemons
    (reply,) = exchange_raw(balancer.socket, b'{"request": "' + b"x" * MAX_REQUEST_BYTES + b'"}\n')
    assert (reply["ok"], reply["code"]) == (False, "too-long")
    assert balancer.answers()


def test_many_requests_on_one_connection_and_blank_lines(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    balancer, _ = daemons
    replies = exchange_raw(balancer.socket, b'{"request": "accounts"}\n\n{oops\n{"request": "accounts"}\n')
    assert [reply["ok"] for reply in replies] == [True, False, True]


def test_half_closed_and_silent_clients_do_not_hurt(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    balancer, _ = daemons
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(balancer.socket))
    (reply,) = exchange_raw(balancer.socket, b'{"request": "acc')  # cut off, then EOF
    assert (reply["ok"], reply["code"]) == (False, "bad-json")
    assert balancer.answers()
    silent.close()


def test_socket_mode_is_0660(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    for daemon in daemons:
        assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660


def ask_as(
    path: Path, uid: int, gid: int, groups: list[int], request: bytes = b'{"request": "accounts"}\n'
) -> dict[str, object]:
    """`request` from a child process that dropped to these credentials before connecting."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, only os._exit
        try:
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            os.write(write, json.dumps(exchange_raw(path, request)[0]).encode())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent as the reply
            os.write(write, json.dumps({"ok": None, "code": "client", "error": repr(exc)}).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        reply = pipe.read()
    os.waitpid(pid, 0)
    result: dict[str, object] = json.loads(reply)
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")
def test_only_root_the_daemons_user_and_its_group_may_talk(layout: Layout) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="cl-peers-"))  # a path every user can reach
    runtime.chmod(0o755)
    daemon = DaemonProcess("balancer", layout, env=layout.env(CL_RUNTIME_DIR=str(runtime)))
    path = daemon.socket = runtime / "balancer.sock"
    daemon.start()
    try:
        path.chmod(0o666)  # the mode drifted: the peer check still holds
        nobody = 65534
        refused = ask_as(path, nobody, nobody, [])
        assert (refused["ok"], refused["code"]) == (False, "forbidden"), refused
        assert "uid 65534" in str(refused["error"])
        assert ask_as(path, nobody, nobody, [os.getgid()])["ok"] is True  # a member of the daemon's group
        assert ask_as(path, nobody, os.getgid(), [])["ok"] is True
        assert "client refused" in daemon.log()
        forged = ask_as(path, nobody, os.getgid(), [], b'{"request": "run-changed", "run": 1}\n')
        assert (forged["ok"], forged["code"]) == (False, "forbidden"), forged  # an operator: not cl's own
        assert daemon.answers()
    finally:
        daemon.stop()
        shutil.rmtree(runtime)


async def test_an_idle_connection_is_closed_and_the_server_answers_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that connects and says nothing is let go after `IDLE_TIMEOUT` (300 s; shortened here)."""
    monkeypatch.setattr(protocol, "IDLE_TIMEOUT", 0.2)

    async def accounts(_request: protocol.Request, _peer: protocol.Peer) -> protocol.Reply:
        return {"accounts": []}

    server = protocol.ControlServer(tmp_path / "t.sock", {"accounts": accounts})
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "t.sock"))
        assert await asyncio.wait_for(reader.read(), timeout=20) == b""  # closed by the server
        writer.close()
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "t.sock"))
        writer.write(b'{"request": "accounts"}\n')
        assert json.loads(await asyncio.wait_for(reader.readline(), timeout=20)) == {"ok": True, "accounts": []}
        writer.close()
    finally:
        await server.close()


async def test_an_operator_holds_a_bounded_number_of_connections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One peer uid cannot take every descriptor: past the cap it is refused at once, and a
    connection it closes makes room again."""
    monkeypatch.setattr(protocol, "MAX_CONNECTIONS_PER_UID", 2)

    async def accounts(_request: protocol.Request, _peer: protocol.Peer) -> protocol.Reply:
        return {"accounts": []}

    server = protocol.ControlServer(tmp_path / "t.sock", {"accounts": accounts})
    server._uncapped = set()  # this test's process is root, which is never capped
    await server.start()

    async def ask() -> dict[str, object]:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "t.sock"))
        writer.write(b'{"request": "accounts"}\n')
        reply: dict[str, object] = json.loads(await asyncio.wait_for(reader.readline(), timeout=20))
        writer.close()
        return reply

    try:
        held = [await asyncio.open_unix_connection(str(tmp_path / "t.sock")) for _ in range(2)]
        await asyncio.sleep(0)  # let the server take them
        for _ in range(100):
            if sum(server._connections.values()) == 2:
                break
            await asyncio.sleep(0.01)
        refused = await ask()
        assert (refused["ok"], refused["code"]) == (False, "too-many-connections")
        held.pop()[1].close()
        for _ in range(100):
            if sum(server._connections.values()) < 2:
                break
            await asyncio.sleep(0.01)
        assert (await ask())["ok"] is True
        for _, writer in held:
            writer.close()
    finally:
        await server.close()
