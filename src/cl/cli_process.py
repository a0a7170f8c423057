"""One running `claude -p --input-format stream-json --output-format stream-json --verbose`.

The worker talks to it a turn at a time: each user message is a line on its standard input
(`send`), and the CLI answers with events ending in a `result`, then waits for the next line.
Closing its standard input (`close`) ends it. Its standard output is read by a thread into the
worker's event queue, so the worker waits for the CLI's next line, the end of its output, or a
wake-up (a signal: a live move handed over) in one place. Its standard error goes straight to
the run's log. When the CLI exits, its whole process group goes with it (what it left running
could hold its output open).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from cl import redact
from cl.claude_code.stream import user_message
from cl.cli_start import Process
from cl.cli_user import CliUser

MAX_LOG_BYTES = 64 * 2**20
"""A run's log, at most (the stream is still read to the end)."""
MAX_LINE = 8 * 2**20
"""A line of the CLI's output, at most; the rest of a longer one is dropped, and the log says so."""
STDERR_LINES = 5
"""The CLI's last lines on standard error that a failure's reason carries."""
STDERR_WIDTH = 200
"""Characters of each of those lines at most."""
MAX_WAITING = 32 * 2**20
"""Bytes of the CLI's output waiting for the worker, at most: past that the reader waits, and so
does the CLI (its pipe fills)."""
QUIET_INTERVAL = 2.0
"""Seconds between `on_quiet` calls while the CLI runs."""
CANCEL_GRACE = 5.0
"""Seconds a stopped CLI has to end on SIGTERM before SIGKILL."""
EXIT_GRACE = 5.0
"""Seconds a CLI has to exit once its input is closed. One with background tasks (a server its
Bash tool started) waits for them instead, and takes a turn of its own when one ends: it is
stopped, whole tree, as any CLI whose job is over."""


class Event(enum.Enum):
    EOF = "eof"
    """The CLI's standard output ended: it exited (or closed it)."""
    WAKE = "wake"
    """Something outside the CLI wants the worker to look at the store (a live move handed over)."""


class Events(queue.SimpleQueue[bytes | Event]):
    """Lines of the CLI's output and `Event`s, for the worker. `put` never waits (a signal handler
    puts a WAKE); `put_line` waits while `MAX_WAITING` bytes of output are not read yet."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting = 0
        self._room = threading.Condition()

    def put_line(self, line: bytes) -> None:
        with self._room:
            self._room.wait_for(lambda: self._waiting < MAX_WAITING)
            self._waiting += len(line)
        self.put(line)

    def get(self, block: bool = True, timeout: float | None = None) -> bytes | Event:
        item = super().get(block, timeout)
        if isinstance(item, bytes):
            with self._room:
                self._waiting -= len(item)
                self._room.notify_all()
        return item


def lines(stream: IO[bytes]) -> Iterator[bytes]:
    """The stream's lines, each at most `MAX_LINE` bytes: of a longer one, a line that says so."""
    while line := stream.readline(MAX_LINE):
        if len(line) == MAX_LINE and not line.endswith(b"\n"):
            while (rest := stream.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                pass  # the rest of it, read and dropped
            line = f"[cl: a line of the CLI's output longer than {MAX_LINE} bytes, dropped]\n".encode()
        yield line


class Output:
    """The current run's log: every line redacted on its way in, from stdout and stderr alike, at
    most `MAX_LOG_BYTES` of it (the state store shares its disk: the CLI's output must not fill
    it). A live move switches it to the next run's log (`use`)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._room = 0
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self.use(path)

    def use(self, path: Path) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
            self._file = path.open("ab")
            self._room = MAX_LOG_BYTES - self._file.tell()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def write(self, line: str) -> None:
        data = redact.scrub_line(line).encode()
        with self._lock:
            if self._file is None:
                return
            if len(data) > self._room:
                if self._room >= 0:
                    self._file.write(b"[cl: the output goes on; the log keeps no more of it]\n")
                    self._file.flush()
                self._room = -1
                return
            self._room -= len(data)
            self._file.write(data)
            self._file.flush()

    def copy_stderr(self, stream: IO[bytes]) -> None:
        """The CLI's standard error into the log; its last `STDERR_LINES` lines kept (`stderr`)."""
        for raw in lines(stream):
            line = raw.decode(errors="replace")
            self.write(line)
            if line.strip():
                self._stderr.append(redact.scrub_line(line).strip()[:STDERR_WIDTH])

    def stderr(self) -> tuple[str, ...]:
        """The CLI's standard error's last lines, scrubbed, each `STDERR_WIDTH` characters at most."""
        return tuple(self._stderr)


class CliProcess:
    """A started CLI: `send` a turn, read its lines from `events`, `close` it."""

    def __init__(
        self,
        process: Process,
        *,
        cli: CliUser,
        events: Events,
        output: Output,
        on_quiet: Callable[[], None] | None = None,
    ) -> None:
        """Talk to `process`, just started (`cl.cli_start`) as `cli`, leading a process group."""
        self._cli = cli
        self._events = events
        self._exited = threading.Event()
        """Set once the CLI has exited (one thread waits for it; the rest wait for this)."""
        self.stopped = False
        """The CLI did not exit when its input ended, and was stopped."""
        self.process = process
        self._threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=output.copy_stderr, args=(self.process.stderr,), daemon=True),
            threading.Thread(target=self._end_the_tree, daemon=True),
        ]
        if on_quiet is not None:
            self._threads.append(threading.Thread(target=self._while_running, args=(on_quiet,), daemon=True))
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, text: str) -> None:
        """One user message: the next turn (a CLI that no longer reads ends its output instead)."""
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.process.stdin.write(user_message(text))
            self.process.stdin.flush()

    def close(self) -> int:
        """End of input: the CLI finishes and exits, or is stopped after `EXIT_GRACE` seconds
        (`stopped` says so). Its exit code (what it still printed is left in `events`)."""
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.process.stdin.close()
        if not self._exited.wait(EXIT_GRACE):
            self.stopped = True
            self.stop()
            self._exited.wait()
        return self.process.returncode

    def stop(self) -> None:
        """SIGTERM to the whole tree, SIGKILL after `CANCEL_GRACE` seconds."""
        self.signal_tree(signal.SIGTERM)
        threading.Timer(CANCEL_GRACE, self.signal_tree, (signal.SIGKILL,)).start()

    def signal_tree(self, signum: int) -> None:
        """Signal the CLI's process group; a worker that may not signal the CLI's user (it only may
        become that user) sends it as that user."""
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            kill = ["kill", "-s", signal.Signals(signum).name.removeprefix("SIG"), "--", f"-{self.process.pid}"]
            as_cli = self._cli.become
            subprocess.run(kill, preexec_fn=as_cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    def join(self, timeout: float = 5.0) -> None:
        """Wait for the output threads (the stream read to its end)."""
        for thread in self._threads[:2]:
            thread.join(timeout)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in lines(self.process.stdout):
            self._events.put_line(line)
        self._events.put(Event.EOF)

    def _end_the_tree(self) -> None:
        """Once the CLI has exited, what it left running ends too: its process group (the CLI
        leads one)."""
        self.process.wait()
        self._exited.set()
        self.signal_tree(signal.SIGKILL)

    def _while_running(self, on_quiet: Callable[[], None]) -> None:
        while not self._exited.wait(QUIET_INTERVAL):
            on_quiet()
