"""The control protocol: line-delimited JSON over a Unix stream socket.

A request is one line, a JSON object `{"request": NAME, ...}`; the reply is one line,
`{"ok": true, ...}` or `{"ok": false, "code": CODE, "error": MESSAGE}`. One connection may
carry many requests. A bad request gets a precise error reply, never a crash.

Who may talk: the socket is mode 0660 (its owner and group), and each connection's peer
credentials are checked too (`SO_PEERCRED`, `SO_PEERGROUPS`), so a socket whose mode drifted
still answers only root, the daemon's own user and members of its group. Each handler is given
the peer (`Peer`): a job is its submitter's, and only they, root, the daemons' own user and the
admin group see it or act on it.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import errno
import grp
import json
import os
import re
import socket
import stat
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("cl.protocol")

MAX_REQUEST_BYTES = 64 * 1024
SOCKET_MODE = 0o660
IDLE_TIMEOUT = 300.0
"""Seconds a connection may wait between requests before it is closed."""
REFUSED_WAIT = 1.0
"""Seconds a refused peer has to send its line before the refusal is sent and it is closed."""
MAX_CONNECTIONS_PER_UID = 64
LISTEN_BACKLOG = 4096
"""Connections the kernel holds while the loop is busy: a burst of clients waits, it is not refused."""
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; Python names it from 3.13 on

Request = dict[str, Any]


class Encoded(bytes):
    """A successful reply's object, already encoded as JSON (a large reply built from kept
    pieces); `"ok": true` is added as it is sent, without copying it."""

    __slots__ = ()


Reply = dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a connection, as the kernel says."""

    uid: int
    gid: int
    groups: frozenset[int]

    def sees_all(self, admin_group: str) -> bool:
        """Root, the daemons' own user and members of `admin_group` see every operator's jobs."""
        if self.uid in (0, os.getuid()):
            return True
        try:
            admin = grp.getgrnam(admin_group).gr_gid if admin_group else None
        except KeyError:
            return False
        return admin is not None and (admin == self.gid or admin in self.groups)

    def owns(self, submitter: int | None, admin_group: str) -> bool:
        return submitter == self.uid or self.sees_all(admin_group)


Handler = Callable[[Request, Peer], Awaitable[Reply | Encoded]]


class RequestError(Exception):
    """Raised by a handler: becomes an error reply with this code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


MAX_INTEGER = 2**63 - 1
"""The largest integer the store holds."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def id_field(request: Request, key: str) -> int:
    """The request's `key` (`job`, `run`) as an id, or a bad-request error naming it."""
    value = request.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INTEGER:
        raise RequestError("bad-request", f'"{key}" must be a {key} id')
    return value


def whole_number(request: Request, key: str, low: int, high: int = MAX_INTEGER) -> int | None:
    """The request's `key` as a whole number from `low` to `high`, None if absent."""
    value = request.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError("bad-request", f'"{key}" must be a whole number from {low} to {high}')
    return value


def text_field(request: Request, key: str, *, lines: bool = False) -> str | None:
    """The request's `key` as text, None if absent: no control characters (`lines`: but tabs
    and line breaks), nothing that is not Unicode text (a lone surrogate)."""
    value = request.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError("bad-request", f'"{key}" must be a string')
    if (_CONTROL_BUT_LINES if lines else _CONTROL).search(value):
        raise RequestError("bad-request", f'"{key}" must not hold control characters')
    try:
        value.encode()
    except UnicodeEncodeError:
        raise RequestError("bad-request", f'"{key}" must be Unicode text (it holds a lone surrogate)') from None
    return value


class ControlServer:
    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self._handlers = handlers
        self._connections: Counter[int] = Counter()
        """Open connections per peer uid."""
        self._uncapped = {0, os.getuid()}
        """Root, and the daemons' own user (whose workers talk here), are not capped."""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(self.path)
        self._server = await asyncio.start_unix_server(
            self._serve_client, self.path, limit=MAX_REQUEST_BYTES, backlog=LISTEN_BACKLOG
        )
        os.chmod(self.path, SOCKET_MODE)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._server = None

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer.get_extra_info("socket"))
        refusal = peer_refusal(peer) or self._over_cap(peer)
        self._connections[peer.uid] += 1
        try:
            while True:
                try:  # a refused peer gets a moment to say its line (so the reply is not lost to a reset)
                    line = await asyncio.wait_for(reader.readline(), REFUSED_WAIT if refusal else IDLE_TIMEOUT)
                except ValueError:  # the line outgrew the stream's limit
                    await _send(writer, _error("too-long", f"request line over {MAX_REQUEST_BYTES} bytes"))
                    return
                except TimeoutError:
                    return
                if not line:
                    return
                if refusal is not None:
                    await _send(writer, _error(*refusal))
                    return
                if line.strip():
                    await _send(writer, await self._handle(line, peer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections[peer.uid] -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _over_cap(self, peer: Peer) -> tuple[str, str] | None:
        """An operator holding `MAX_CONNECTIONS_PER_UID` connections already gets no more."""
        if peer.uid in self._uncapped or self._connections[peer.uid] < MAX_CONNECTIONS_PER_UID:
            return None
        log.warning("client refused: too many connections", uid=peer.uid, open=self._connections[peer.uid])
        return "too-many-connections", f"uid {peer.uid} has {MAX_CONNECTIONS_PER_UID} connections open already"

    async def _handle(self, line: bytes, peer: Peer) -> Reply | Encoded:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error("bad-json", f"request is not valid JSON: {getattr(exc, 'msg', 'not UTF-8')}")
        except RecursionError:
            return _error("bad-json", "request is nested too deeply")
        except ValueError:  # an integer past Python's limit on digits
            return _error("bad-json", "request has a number with too many digits")
        if not isinstance(request, dict):
            return _error("bad-request", "request must be a JSON object")
        name = request.get("request")
        if not isinstance(name, str):
            return _error("bad-request", 'request needs a "request" field naming the request')
        handler = self._handlers.get(name)
        if handler is None:
            known = ", ".join(sorted(self._handlers))
            return _error("unknown-request", f"unknown request {name[:64]!r} (known: {known})")
        try:
            reply = await handler(request, peer)
            return reply if isinstance(reply, Encoded) else {"ok": True, **reply}
        except RequestError as exc:
            return _error(exc.code, exc.message)
        except Exception:
            log.exception("request failed", request=name)
            return _error("internal", f"internal error while handling {name!r}; see the daemon's log")


def peer_of(sock: socket.socket) -> Peer:
    _pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return Peer(uid, gid, frozenset(_peer_groups(sock)))


def peer_refusal(peer: Peer) -> tuple[str, str] | None:
    """Why this connection's peer may not talk to us (code, message), or None if it may."""
    if peer.uid in (0, os.getuid()) or os.getgid() == peer.gid or os.getgid() in peer.groups:
        return None
    log.warning("client refused", uid=peer.uid, gid=peer.gid)
    return "forbidden", f"uid {peer.uid} is neither root, the daemon's user, nor in its group (gid {os.getgid()})"


def _peer_groups(sock: socket.socket) -> array.array[int]:
    size = 64
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size * 4)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < 65536:
                size *= 16
                continue
            return array.array("I")
        return array.array("I", raw)


def _error(code: str, message: str) -> Reply:
    return {"ok": False, "code": code, "error": message}


async def _send(writer: asyncio.StreamWriter, reply: Reply | Encoded) -> None:
    if isinstance(reply, Encoded):
        writer.write(b'{"ok":true,')
        writer.write(memoryview(reply)[1:])
        writer.write(b"\n")
    else:
        writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a dead daemon; refuse to replace anything else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()
        return
    finally:
        probe.close()
    raise FileExistsError(f"{path}: another daemon is already listening there")
