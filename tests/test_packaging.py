"""The systemd units, sysusers.d and tmpfiles.d files, checked by systemd's own tools."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "packaging" / "systemd"
DAEMON_UNITS = ["cl-balancer.service", "cl-rescue.service"]
ALL_UNITS = [*DAEMON_UNITS, "cl-worker.socket", "cl-worker@.service"]

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def installed_copy(unit: str, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's console scripts (verify checks they exist)."""
    copy = tmp_path / unit
    copy.write_text((UNITS / unit).read_text().replace("/opt/cl/bin/", f"{Path(sys.executable).parent}/"))
    return copy


def test_units_verify_without_a_single_message(tmp_path: Path) -> None:
    copies = [str(installed_copy(unit, tmp_path)) for unit in ALL_UNITS]
    result = subprocess.run(["systemd-analyze", "verify", *copies], capture_output=True, text=True, check=False)
    # verify exits 0 on unknown keys and merely prints them: any output is a failure.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("unit", DAEMON_UNITS)
def test_exposure_is_at_most_1(unit: str) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=10", str(UNITS / unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= 1.0
    assert result.returncode == 0  # --threshold is on the 0-100 scale: 10 is an exposure of 1.0


def test_units_run_the_console_scripts_as_notify_services() -> None:
    for unit in DAEMON_UNITS:
        text = (UNITS / unit).read_text()
        daemon = unit.removesuffix(".service")
        assert f"ExecStart=/opt/cl/bin/{daemon}\n" in text
        for line in ("Type=notify", "NotifyAccess=main", "User=cl", "RuntimeDirectory=cl", "StateDirectory=cl"):
            assert f"\n{line}\n" in text, line


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_and_tmpfiles_make_the_users_the_roster_and_the_sessions_dirs(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "sysusers.d" / "cl.conf")],
        check=True,
        capture_output=True,
    )
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    assert set(users) == {"cl", "cl-cli"}  # the daemons' user, and the CLI's own
    assert set(groups) == {"cl", "cl-cli", "cl-admin"}
    gid = int(groups["cl"][2])
    cli_uid, cli_gid = int(users["cl-cli"][2]), int(users["cl-cli"][3])
    assert cli_gid != gid  # the CLI is not in the group that may talk to the daemons
    subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(UNITS / "tmpfiles.d" / "cl.conf")],
        check=True,
        capture_output=True,
    )
    roster = (tmp_path / "opt" / "claude").stat()
    assert (oct(roster.st_mode & 0o7777), roster.st_uid, roster.st_gid) == ("0o750", 0, gid)
    sessions = (tmp_path / "var" / "lib" / "cl-sessions").stat()
    assert (oct(sessions.st_mode & 0o7777), sessions.st_uid, sessions.st_gid) == ("0o700", cli_uid, cli_gid)


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_make_install_lays_out_a_working_tree(tmp_path: Path) -> None:
    """`make install` into a temp root: the venv's commands run, units, user and roster dir are there."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(["make", "-C", str(UNITS.parents[1]), "install", f"ROOT={root}"], check=True, capture_output=True)
    help_text = subprocess.run(
        [str(root / "opt/cl/bin/cl"), "--help"], check=True, capture_output=True, text=True
    ).stdout
    assert "accounts" in help_text
    for daemon in ("cl-balancer", "cl-rescue"):
        assert (root / "opt/cl/bin" / daemon).exists()
        assert (root / "etc/systemd/system" / f"{daemon}.service").read_text() == (
            UNITS / f"{daemon}.service"
        ).read_text()
    assert [line.split(":")[0] for line in (root / "etc/passwd").read_text().splitlines()] == ["cl", "cl-cli"]
    assert (root / "opt/claude").is_dir()
