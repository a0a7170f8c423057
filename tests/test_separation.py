"""What each daemon and worker says and refuses about who runs the CLI (the attacks themselves are
in test_hostile_cli.py)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from cl.cli_user import CliUser, CliUserError, adopt, take
from cl.doctor import exists
from utils import BIN, POOL

NOBODY = 65534
SYSTEM_PYTHON = Path("/usr/bin/python3")
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]


def test_a_missing_pool_user_is_an_error_never_a_reason_to_run_the_cli_as_the_worker() -> None:
    with pytest.raises(CliUserError, match="user 'no-such-user' does not exist"):
        CliUser.named("no-such-user")
    if exists(pwd.getpwnam, f"{POOL}-1"):
        first = CliUser.named(f"{POOL}-1")
        assert (first.name, first.separate) == (f"{POOL}-1", first.uid != os.getuid())


def test_a_worker_takes_a_launch_only_from_root_or_its_own_user() -> None:
    """`cl-worker --from-socket` (a `cl-worker@` unit's stdin is the connection) checks its peer."""
    if os.getuid() != 0 or shutil.which("setpriv") is None or not SYSTEM_PYTHON.exists():
        pytest.skip("needs root, setpriv and a python3 any user can run, to connect as another user")
    reachable = Path(tempfile.mkdtemp(dir="/var/tmp"))  # pytest's tmp dirs are closed to other users
    reachable.chmod(0o755)
    path = reachable / "worker.sock"
    with contextlib.ExitStack() as cleanup, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        cleanup.callback(shutil.rmtree, reachable)
        listener.settimeout(60)
        listener.bind(str(path))
        path.chmod(0o777)
        listener.listen()
        client = subprocess.Popen(
            [*AS_NOBODY, str(SYSTEM_PYTHON), "-c", CONNECT, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        connection, _ = listener.accept()
    with connection:
        worker = subprocess.run(
            [str(BIN / "cl-worker"), "--from-socket"],
            stdin=connection.fileno(),
            stdout=connection.fileno(),
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    assert (worker.returncode, worker.stderr.strip()) == (2, f"cl-worker: refused a launch from uid {NOBODY}")
    out, _ = client.communicate(timeout=60)
    assert b"pid" not in out  # it never got a worker


CONNECT = """
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.sendall(json.dumps({"run": 1, "env": {"CL_CLAUDE_BIN": "/bin/sh"}}).encode() + b"\\n")
print(sock.makefile().readline())
"""


def test_a_cli_letting_go_of_what_it_inherits_frees_no_user_of_the_pool(tmp_path: Path) -> None:
    if not exists(pwd.getpwnam, f"{POOL}-2"):
        pytest.skip("no pool here (systemd-sysusers packaging/systemd/sysusers.d/cl.conf makes it)")
    first = take(POOL, 2, tmp_path)
    assert first is not None
    assert first.inherited is not None
    fcntl.flock(first.inherited, fcntl.LOCK_UN)  # what a CLI may do with the descriptor it inherits
    second = take(POOL, 2, tmp_path)
    assert second is not None
    assert second.user != first.user
    assert take(POOL, 2, tmp_path) is None
    first.release()  # the worker's end
    again = take(POOL, 2, tmp_path)
    assert again is not None
    assert again.user == first.user


def test_a_config_dir_changes_hands_but_not_what_another_owns_in_it(tmp_path: Path) -> None:
    """A hard link the CLI made in its config dir to someone else's file keeps its owner."""
    if os.getuid() != 0 or not exists(pwd.getpwnam, f"{POOL}-2"):
        pytest.skip("needs root and the pool")
    earlier, later = CliUser.named(f"{POOL}-1"), CliUser.named(f"{POOL}-2")
    tree = tmp_path / "job-1"
    (tree / "projects").mkdir(parents=True)
    (tree / "projects" / "t.jsonl").touch()
    (tree / "not-its-own").touch()  # root's
    for path in (tree, tree / "projects", tree / "projects" / "t.jsonl"):
        os.chown(path, earlier.uid, earlier.gid)
    adopt(tree, later)
    owners = {path.name: path.stat().st_uid for path in (tree, tree / "projects", tree / "projects" / "t.jsonl")}
    assert owners == {"job-1": later.uid, "projects": later.uid, "t.jsonl": later.uid}
    assert (tree / "not-its-own").stat().st_uid == 0
