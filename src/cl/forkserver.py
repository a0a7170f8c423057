"""Starting workers fast without systemd: one pre-imported process that forks a worker per run.

A fresh Python worker spends ~130 ms importing before it can claim its run, most of a move's
latency. The fork server imports the worker once, then forks a child per request (a few ms).
Each child leaves the server's session (setsid) and runs the worker with the server's own
environment (the daemon's); a request names the run and nothing else. SIGCHLD is ignored, so
the kernel reaps the children; a pidfd still tells the launcher when each ends. The server
exits when its launcher closes its stdin (the launcher stopped or died); the workers it forked
live on, detached, as workers always do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import traceback
from typing import IO


class ForkServer:
    """The launcher's side: starts the server on first use (and again if it died)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._lock:
            self._running()

    def spawn(self, run_id: int) -> int:
        """Fork a worker for `run_id`; its pid."""
        request = json.dumps({"run": run_id}).encode() + b"\n"
        with self._lock:
            for _attempt in range(2):  # a server that died is replaced once
                process = self._running()
                assert process.stdin is not None
                assert process.stdout is not None
                try:
                    process.stdin.write(request)
                    process.stdin.flush()
                    reply = process.stdout.readline()
                except BrokenPipeError:
                    reply = b""
                if reply:
                    return int(json.loads(reply)["pid"])
                self._discard()
            raise OSError("the worker fork server does not answer; see the log")

    def close(self) -> None:
        """End the server (its workers live on); the next spawn starts a new one."""
        with self._lock:
            self._discard()

    def _discard(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            for pipe in (self._process.stdin, self._process.stdout):
                if pipe is not None:
                    pipe.close()
            self._process = None

    def _running(self) -> subprocess.Popen[bytes]:
        if self._process is not None and self._process.poll() is not None:
            self._discard()
        if self._process is None:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "cl.forkserver"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,  # Ctrl-C on `make run` stops the daemons, not the workers
            )
        return self._process


def serve(requests: IO[bytes], replies: IO[str]) -> None:
    from cl import worker  # noqa: PLC0415 - the expensive import, done once before any fork

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setsid()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the worker waits for its CLI
                devnull = os.open(os.devnull, os.O_RDWR)
                os.dup2(devnull, 0)
                os.dup2(devnull, 1)
                code = worker.run(int(request["run"]))
            except BaseException:  # noqa: BLE001 - a child must never return into the server's loop
                traceback.print_exc()
            finally:
                os._exit(code)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout)
