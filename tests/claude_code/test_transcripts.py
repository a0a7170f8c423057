"""Transcript paths as the CLI names them, and reading the last assistant turn."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl.claude_code.environment import worker_environment
from cl.claude_code.transcripts import project_dir_name, transcript_path
from cl.credentials import parse_credential
from utils import Planted, api_key_credential, oauth_credential


@pytest.mark.parametrize(
    ("cwd", "name"),
    [
        ("/tmp/demo/work", "-tmp-demo-work"),
        ("/home/u/My_Dir.v2/sub dir/ü-x@y+z", "-home-u-My-Dir-v2-sub-dir---x-y-z"),
        ("/tmp/😀", "-tmp---"),  # outside the BMP: two UTF-16 units, two dashes
    ],
)
def test_project_dir_names(cwd: str, name: str) -> None:
    assert project_dir_name(cwd) == name


def test_long_names_are_cut_and_hashed() -> None:
    cwd = "/tmp/" + "a" * 300
    name = project_dir_name(cwd)
    head, _, suffix = name.rpartition("-")
    assert head == ("-tmp-" + "a" * 300)[:200]
    assert suffix.isalnum()
    assert project_dir_name(cwd + "b") != name


def test_transcript_path_resolves_the_cwd(tmp_path: Path) -> None:
    real = tmp_path / "work"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    path = transcript_path(Path("/cfg"), str(tmp_path / "link"), "sid")
    assert path == Path("/cfg/projects") / project_dir_name(str(real)) / "sid.jsonl"


def test_worker_environment_scrubs_and_sets_only_the_accounts_credential(planted: Planted) -> None:
    base = {
        "PATH": "/usr/bin",
        "ANTHROPIC_API_KEY": "leaked-from-the-daemon",
        "CLAUDE_CODE_OAUTH_TOKEN": "x",
        "ANTHROPIC_AUTH_TOKEN": "y",
        "CLAUDE_CODE_RETRY_WATCHDOG": "1",
        "NOTIFY_SOCKET": "/run/systemd/notify",
    }
    oauth = parse_credential("a", oauth_credential(planted).encode())
    env = worker_environment(base, oauth, "/state/sessions/1", {"CLAUDE_CODE_MAX_RETRIES": "0"})
    assert env["CLAUDE_CONFIG_DIR"] == "/state/sessions/1"
    assert env["CLAUDE_CODE_MAX_RETRIES"] == "0"
    assert env["DISABLE_TELEMETRY"] == "1"
    for gone in (
        "ANTHROPIC_API_KEY",
        "CLAUDE_CODE_OAUTH_TOKEN",
        "ANTHROPIC_AUTH_TOKEN",
        "CLAUDE_CODE_RETRY_WATCHDOG",
        "NOTIFY_SOCKET",
    ):
        assert gone not in env
    key = parse_credential("k", api_key_credential(planted).encode())
    assert worker_environment(base, key, "/c")["ANTHROPIC_API_KEY"] == key.secrets[0].reveal()
    assert "CLAUDE_CODE_OAUTH_TOKEN" not in worker_environment(base, key, "/c")
    retry = worker_environment(base, key, "/c", {"CLAUDE_CODE_RETRY_WATCHDOG": "1"})
    assert "CLAUDE_CODE_RETRY_WATCHDOG" not in retry  # not even from the configuration
