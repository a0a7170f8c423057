"""Where a job may run: never one of cl's own places, and only where both the submitter and the
CLI's user can write. Each refusal names its rule."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cl import sandbox, workdir
from utils import DaemonProcess, Layout, cl

NOBODY = 65534


@pytest.mark.usefixtures("balancer")
@pytest.mark.parametrize(
    ("where", "rule"),
    [
        ("/", "the root directory is never a job's working directory"),
        ("state", "it is cl's state directory"),
        ("state/logs", "it is inside cl's state directory"),
        ("sessions", "it is cl's sessions directory"),
        ("run", "it is cl's runtime directory"),
        ("claude", "it is cl's credentials directory"),
        (".", "it holds cl's"),
        ("config", "it is cl's configuration directory"),
        ("config/..", "it holds cl's"),
    ],
)
def test_a_job_never_runs_in_cls_own_places(layout: Layout, where: str, rule: str) -> None:
    (layout.root / "state" / "logs").mkdir(exist_ok=True)
    (layout.root / "sessions").mkdir(exist_ok=True)
    cwd = where if where == "/" else str((layout.root / where).resolve())
    refused = cl(layout, "submit", "--cwd", cwd, "--prompt", "x", CL_CONFIG=str(layout.root / "config" / "c.toml"))
    assert refused.returncode == 2, refused.stdout
    assert refused.stderr.startswith(f"cl: cl-balancer: --cwd {cwd}: {rule}"), refused.stderr


@pytest.fixture
def balancer(layout: Layout) -> DaemonProcess:
    (layout.root / "config").mkdir()
    (layout.root / "config" / "c.toml").touch()
    return DaemonProcess("balancer", layout, env=layout.env(CL_CONFIG=str(layout.root / "config" / "c.toml"))).start()


def test_both_the_submitter_and_the_clis_user_must_be_able_to_write_it(reachable: Path) -> None:
    shared, closed = reachable / "shared", reachable / "closed"
    shared.mkdir(mode=0o755)
    shared.chmod(0o2770)
    os.chown(shared, 0, NOBODY - 1)
    closed.mkdir()
    closed.chmod(0o700)
    (closed / "inside").mkdir(mode=0o777)
    member = workdir.Writer("a member", NOBODY, frozenset({NOBODY - 1}))
    stranger = workdir.Writer("a stranger (uid 65534)", NOBODY, frozenset({NOBODY}))
    assert workdir.check(str(shared), {}, [member]) == str(shared)
    with pytest.raises(workdir.WorkdirRefused, match="a stranger \\(uid 65534\\) cannot write it"):
        workdir.check(str(shared), {}, [member, stranger])
    with pytest.raises(workdir.WorkdirRefused, match=f"a member cannot reach it \\({closed} is closed to them\\)"):
        workdir.check(str(closed / "inside"), {}, [member])
    root = workdir.Writer("root", 0, frozenset())
    assert workdir.check(str(closed / "inside"), {}, [root]) == str(closed / "inside")


def test_a_symlink_is_resolved_before_the_rules(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "innocent").symlink_to(state)
    with pytest.raises(workdir.WorkdirRefused, match="it is cl's state directory"):
        workdir.check(str(tmp_path / "innocent"), {"state directory": state}, [])


def test_a_directory_is_opened_with_no_symlink_followed_anywhere_on_its_path(tmp_path: Path) -> None:
    real = tmp_path / "real" / "project"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    fd = sandbox.open_directory(str(real))
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == str(real)
    finally:
        os.close(fd)
    for path in (tmp_path / "link" / "project", tmp_path / "link"):
        with pytest.raises(OSError, match="a symlink is on the way") as refused:
            sandbox.open_directory(str(path))
        assert refused.value.errno == errno.ELOOP
    (tmp_path / "file").touch()
    with pytest.raises(NotADirectoryError):
        sandbox.open_directory(str(tmp_path / "file"))


def test_a_view_whose_cwd_is_not_the_directory_opened_runs_nothing(tmp_path: Path) -> None:
    """bwrap binds the opened directory by the path the kernel gives for it, resolved again as it
    builds the view. The view checks its cwd against what was opened before the CLI starts: here
    the expectation is made another directory's, as if a swap had won that instant."""
    if shutil.which("bwrap") is None:
        pytest.skip("no bubblewrap here")
    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir()
    other.mkdir()
    ran = work / "ran"
    fds = [sandbox.open_directory(str(path)) for path in (work, work)]
    try:
        view = sandbox.View((fds[0], str(work)), (fds[1], str(work)), hidden=[])
        argv = sandbox.argv(view, ["/bin/touch", str(ran)])
        assert subprocess.run(argv, pass_fds=fds, check=False).returncode == 0
        assert ran.exists()  # the check itself lets the right directory through
        ran.unlink()
        opened = os.stat(work)
        theirs = os.stat(other)
        argv[argv.index(f"{opened.st_dev}:{opened.st_ino}")] = f"{theirs.st_dev}:{theirs.st_ino}"
        refused = subprocess.run(argv, pass_fds=fds, capture_output=True, text=True, check=False)
    finally:
        for fd in fds:
            os.close(fd)
    assert (refused.returncode, refused.stderr) == (125, "cl: the view does not hold the job's directory\n")
    assert not ran.exists()
