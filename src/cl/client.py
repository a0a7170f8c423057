"""The client side of the control protocol (see `protocol.py`): one request, one reply.

Kept apart from the server so that `cl` and the workers start without importing asyncio.
"""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path
from typing import Any

MAX_PROMPT_BYTES = 48 * 1024
"""A prompt's size at most, in UTF-8 bytes (`cl submit`, `cl send`): it goes in one request line
(64 KiB at most, `cl.protocol`) and into the pipe to the CLI's standard input. `cl` says so before
sending anything; the balancer refuses a larger one too."""


class DaemonUnreachable(Exception):
    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        """What connecting said, if it said anything (EACCES: not allowed to)."""


def call(path: Path, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request and return the reply (the `ok` field says how it went)."""
    reply: dict[str, Any] = json.loads(exchange(path, request, timeout))
    return reply


def exchange(path: Path, request: dict[str, Any], timeout: float = 10.0) -> bytes:
    """Send one request and return the reply's line, not yet decoded."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n", socket.MSG_NOSIGNAL)  # a closed peer: EPIPE, said
            chunks: list[bytes] = []
            while not chunks or not chunks[-1].endswith(b"\n"):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise DaemonUnreachable(f"{path}: connection closed before a reply")
                chunks.append(chunk)
    except OSError as exc:
        raise DaemonUnreachable(f"{path}: {exc.strerror or exc}", exc.errno) from None
    return b"".join(chunks)


def tell(path: Path, request: dict[str, Any], timeout: float = 1.0) -> None:
    """Send a notice that the daemon may act on; nobody waits for it if the daemon is down."""
    with contextlib.suppress(DaemonUnreachable, ValueError):
        call(path, request, timeout)
