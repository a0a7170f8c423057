"""`cl accounts` against real daemons: views side by side, differences loud, exit codes."""

from __future__ import annotations

import json
import subprocess

from utils import BIN, DaemonProcess, Layout, Planted, cl, oauth_credential, wait_until, write_credential


def test_both_views_side_by_side(
    layout: Layout, planted: Planted, daemons: tuple[DaemonProcess, DaemonProcess]
) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    write_credential(layout.credentials, "zz", "not json")
    wait_until(lambda: all(len(d.states()) == 2 for d in daemons), "both daemons to see both files")
    result = cl(layout, "accounts")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ACCOUNT", "BALANCER", "RESCUE", "REASON"]
    assert lines[1].split() == ["a1", "ok", "ok"]
    assert lines[2].split()[:2] == ["zz", "invalid"]
    assert "malformed JSON" in lines[2]

    as_json = json.loads(cl(layout, "accounts", "--json").stdout)
    assert set(as_json) == {"balancer", "rescue"}
    assert as_json["balancer"] == as_json["rescue"]
    assert [a["name"] for a in as_json["balancer"]] == ["a1", "zz"]
    assert {"name", "state"} <= set(as_json["balancer"][0])

    only = json.loads(cl(layout, "accounts", "--from", "rescue", "--json").stdout)
    assert only == as_json["rescue"]
    table = cl(layout, "accounts", "--from", "balancer").stdout
    assert table.splitlines()[0].split() == ["ACCOUNT", "STATE", "KIND", "EXPIRES", "REASON"]


def test_differing_views_are_loud(layout: Layout, planted: Planted) -> None:
    # Two daemons pointed at different directories: the situation `cl accounts` must catch.
    write_credential(layout.credentials, "a", oauth_credential(planted))
    other = layout.root / "other"
    other.mkdir()
    write_credential(other, "b", oauth_credential(planted))
    balancer = DaemonProcess("balancer", layout).start()
    rescue = DaemonProcess("rescue", layout, env=layout.env(CL_CREDENTIALS_DIR=str(other))).start()
    try:
        result = cl(layout, "accounts")
        assert result.returncode == 1
        assert "different accounts" in result.stderr
        assert "a: only cl-balancer sees it" in result.stderr
        assert "b: only cl-rescue sees it" in result.stderr
    finally:
        balancer.stop()
        rescue.stop()


def test_unreachable_daemon_exits_3(layout: Layout) -> None:
    balancer = DaemonProcess("balancer", layout).start()
    try:
        result = cl(layout, "accounts")
        assert result.returncode == 3
        assert "cl-rescue is unreachable" in result.stderr
        assert cl(layout, "accounts", "--from", "balancer").returncode == 0
    finally:
        balancer.stop()


def test_usage_and_configuration_errors_exit_2(layout: Layout) -> None:
    assert cl(layout, "accounts", "--from", "nobody").returncode == 2
    result = subprocess.run(
        [str(BIN / "cl"), "accounts"],
        env=layout.env(CL_WATCH_STEP_MS="0"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "CL_WATCH_STEP_MS" in result.stderr
