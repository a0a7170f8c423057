"""Hostile and broken credential files against real daemons.

Each bad file gets the right state and one clear log line; the daemons keep running and the
other accounts keep working. When the suite runs as root the daemons run without
CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (setpriv), so that a mode 000 file really is unreadable.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from utils import Layout, Planted, both, cl, oauth_credential, wait_until, write_credential


def unprivileged() -> dict[str, object]:
    """DaemonProcess options under which permissions bind, as they do for the `cl` user."""
    if os.geteuid() != 0:
        return {}
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable to the daemons")
    return {"wrap": ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]}


def drop(layout: Layout, name: str, content: str | bytes, mode: int = 0o600) -> Path:
    path = layout.credentials / f"credentials-{name}.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return path


def drop_bad_files(layout: Layout, planted: Planted) -> dict[str, str]:
    """The matrix of bad files, dropped in while the daemons run; the state each must get."""
    drop(layout, "bad-json", '{"claudeAiOauth": {')
    drop(layout, "empty", "")
    drop(layout, "blanked", json.dumps({"claudeAiOauth": {"accessToken": "", "expiresAt": 0}}))
    an_hour_ago = int((time.time() - 3600) * 1000)
    drop(layout, "expired", json.dumps({"claudeAiOauth": {"accessToken": planted.token(), "expiresAt": an_hour_ago}}))
    drop(layout, "renewable", oauth_credential(planted, expires_at_ms=an_hour_ago))  # it has a refresh token
    drop(layout, "wrong-types", json.dumps({"claudeAiOauth": {"accessToken": 123}}))
    drop(layout, "binary", b"\xff\xd8\xff\xe0" + os.urandom(512))
    with (layout.credentials / "credentials-huge.json").open("wb") as huge:
        huge.truncate(50 * 1024 * 1024)
    os.mkfifo(layout.credentials / "credentials-fifo.json")
    (layout.credentials / "credentials-dir.json").mkdir()
    (layout.credentials / "credentials-link.json").symlink_to(layout.credentials / "credentials-good.json")
    (layout.credentials / "credentials-outside.json").symlink_to("/etc/passwd")
    elsewhere = layout.root / "elsewhere.json"
    elsewhere.write_text(oauth_credential(planted))
    os.link(elsewhere, layout.credentials / "credentials-hardlink.json")
    os.close(os.open(os.fsencode(layout.credentials) + b"/credentials-\xff\xfe.json", os.O_CREAT | os.O_WRONLY))
    expected = {
        "bad-json": "invalid",
        "empty": "invalid",
        "blanked": "needs-login",
        "expired": "expired",
        "renewable": "ok",
        "wrong-types": "invalid",
        "binary": "invalid",
        "huge": "invalid",
        "fifo": "invalid",
        "dir": "invalid",
        "link": "invalid",
        "outside": "invalid",
        "hardlink": "invalid",
        "unreadable": "invalid",
        "loose": "ok",  # works, and is warned about
    }
    drop(layout, "unreadable", oauth_credential(planted), mode=0o000)
    drop(layout, "loose", oauth_credential(planted), mode=0o644)
    return expected


def test_bad_files_are_reported_once_and_harm_nothing(layout: Layout, planted: Planted) -> None:
    drop(layout, "good", oauth_credential(planted))
    with both(layout, **unprivileged()) as (balancer, rescue):
        expected = {"good": "ok"} | drop_bad_files(layout, planted)
        wait_until(
            lambda: balancer.file_states() == rescue.file_states() == expected, f"both daemons to show {expected}"
        )

        # A half-written file is invalid until its writer finishes, then it is an account.
        content = oauth_credential(planted)
        half = drop(layout, "half", content[: len(content) // 2])
        wait_until(lambda: rescue.file_states().get("half") == "invalid", "the half-written file to show as invalid")
        with half.open("a") as f:
            f.write(content[len(content) // 2 :])
        expected |= {"half": "ok"}
        write_credential(layout.credentials, "late", oauth_credential(planted))
        expected |= {"late": "ok"}
        wait_until(lambda: balancer.file_states() == rescue.file_states() == expected, "the good accounts to work on")

        reasons = {a["name"]: a["reason"] for a in balancer.request({"request": "accounts"})["accounts"]}
        assert reasons["huge"] == "too large (52428800 bytes, limit 65536)"
        assert reasons["fifo"] == reasons["dir"] == "not a regular file"
        assert reasons["link"].startswith("symlink refused")
        assert reasons["outside"].startswith("symlink refused")
        assert reasons["hardlink"] == "hard link refused (2 names): copy the file in instead"
        assert reasons["binary"] == "not UTF-8 text"
        assert "accessToken must be a string" in reasons["wrong-types"]
        assert reasons["unreadable"] == "unreadable: permission denied"

        # A full resync (SIGHUP) sees the same problems again and does not repeat itself.
        for daemon in (balancer, rescue):
            daemon.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            wait_until(lambda d=daemon: "reloaded" in d.log(), f"cl-{daemon.name} to reload")  # type: ignore[misc]
            log = daemon.log()
            for name in ("bad-json", "empty", "huge", "fifo", "dir", "link", "wrong-types"):
                told = [line for line in log.splitlines() if "account invalid" in line and f"account={name} " in line]
                assert len(told) == 1, name
            assert log.count("file ignored: not a valid credential name") == 1
            assert log.count("credential readable by group or others account=loose") == 1
            assert r"credentials-\xff\xfe.json" in log
            assert daemon.process.poll() is None  # type: ignore[union-attr]


def test_a_misnamed_or_invalid_file_is_said_at_its_event_and_again_only_when_its_content_changes(
    layout: Layout, planted: Planted
) -> None:
    """No full rescan helps here (`resync_interval` an hour): the watch event alone says it."""
    with both(layout, env=layout.env(CL_RESYNC_INTERVAL="3600")) as (balancer, rescue):
        wait_until(lambda: "ready" in balancer.log() and "ready" in rescue.log(), "both daemons to start")
        misnamed = layout.credentials / "credential-a9.json"
        misnamed.write_text(oauth_credential(planted))
        write_credential(layout.credentials, "bad", "{")
        said = "file ignored: not a valid credential name"
        wait_until(lambda: said in balancer.log() and said in rescue.log(), "the misnamed file to be said at once")
        listed = cl(layout, "accounts")
        assert "ignored: credential-a9.json: not a credential file's name; call it credentials-a9.json" in listed.stdout
        shown = json.loads(cl(layout, "accounts", "--json").stdout)
        assert shown["ignored"] == [{"file": "credential-a9.json", "rename_to": "credentials-a9.json"}]
        misnamed.chmod(0o640)  # a chmod is no new content: nothing said again
        (layout.credentials / "credentials-bad.json").chmod(0o640)
        write_credential(layout.credentials, "marker", oauth_credential(planted))  # an event after both
        wait_until(lambda: "account added account=marker" in balancer.log(), "the events after the chmods")
        assert balancer.log().count(said) == 1
        assert balancer.log().count("account invalid account=bad") == 1
        misnamed.write_text(oauth_credential(planted) + " ")  # new content: said again
        wait_until(lambda: balancer.log().count(said) == 2, "the new content to be said")
        misnamed.rename(layout.credentials / "credentials-a9.json")
        wait_until(lambda: "a9" in balancer.file_states(), "the renamed file to be an account")
        assert json.loads(cl(layout, "accounts", "--json").stdout)["ignored"] == []
