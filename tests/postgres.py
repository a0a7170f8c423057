"""A real PostgreSQL server for the tests: Debian's `postgresql` package, a cluster of the suite's
own in a temporary directory, listening on a Unix socket there and on no TCP port.

Made with `initdb` and `pg_ctl` as the `postgres` user when the suite runs as root (as CI does),
as the suite's own user otherwise. Each test gets a database of its own (`Server.database`).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

REQUIRED = "REQUIRE_POSTGRESQL"
"""Set to `required` (as `.ci/run` does): a server that cannot start fails the tests instead of
skipping them. Not a `CL_` name: every `CL_*` variable is one of cl's settings."""


class Unavailable(Exception):
    """No server can run here; the message says why."""


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    if initdb := shutil.which("initdb"):
        return Path(initdb).parent
    raise Unavailable("PostgreSQL's server is not installed (apt install postgresql)")


class Server:
    def __init__(self) -> None:
        bindir = _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="cl-postgresql-"))
        self._as: list[str] = []
        if os.getuid() == 0:
            try:
                postgres = pwd.getpwnam("postgres")
            except KeyError:
                raise Unavailable("no user postgres to run the server as") from None
            os.chown(self.root, postgres.pw_uid, postgres.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self.data = self.root / "data"
        self._pg_ctl = [str(bindir / "pg_ctl"), "-D", str(self.data)]
        self._numbers = itertools.count(1)
        self._options = f"-k {self.root} -c listen_addresses='' -c fsync=off -c max_connections=200"
        try:
            self._run(str(bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
            self._start()
        except Unavailable:
            self.stop()
            raise

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self._as, *argv], capture_output=True, text=True, check=False, cwd=self.root)
        if done.returncode != 0:
            log = self.root / "server.log"
            said = done.stderr.strip() or (log.read_text() if log.exists() else "")
            raise Unavailable(f"{Path(argv[0]).name} failed: {said[-2000:]}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql:///{database}?host={self.root}&user=postgres"

    def database(self) -> str:
        """A new, empty database's URL."""
        name = f"test_{next(self._numbers)}"
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)

    def sql(self, statement: str, *parameters: Any) -> list[tuple[Any, ...]]:
        """Run one statement (`%s` placeholders) as the superuser; its rows, if it has any."""
        with psycopg.connect(self.url(), autocommit=True) as connection:
            cursor = connection.execute(statement, parameters or None)
            return cursor.fetchall() if cursor.description else []

    def _start(self) -> None:
        self._run(*self._pg_ctl, "-o", self._options, "-l", str(self.root / "server.log"), "-w", "start")

    def crash(self) -> None:
        """kill -9 the server, every process of it at once (as an OOM killer or a power cut leaves
        it), and start it again: it recovers from its write-ahead log."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        family = [postmaster, *_children(postmaster)]
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in family):
            if time.monotonic() > deadline:
                raise Unavailable(f"the server's processes outlived SIGKILL: {family}")
            time.sleep(0.01)
        for lock in (self.data / "postmaster.pid", self.root / ".s.PGSQL.5432.lock"):
            lock.unlink()  # a zombie nobody reaps (no init here) would pass for their owner
        self._start()

    def restart(self) -> None:
        """Stop the server (every connection dropped) and start it again with the same options."""
        self._run(*self._pg_ctl, "-m", "fast", "-l", str(self.root / "server.log"), "-w", "restart")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self._as, *self._pg_ctl, "-m", "immediate", "stop"], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def _children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == parent:
                found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie (what its parent has not reaped yet is gone for us)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"
