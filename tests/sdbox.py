"""A throwaway systemd 252 for tests (PID 1 in a box made by ../shared/tools/sdbox), with cl installed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
SDBOX = PROJECT.parent / "shared" / "tools" / "sdbox"
UNITS = PROJECT / "packaging" / "systemd"
FAKES = PROJECT / "tests" / "fakes"

Box = Callable[..., subprocess.CompletedProcess[str]]


def unavailable() -> str | None:
    """Why no box can run here, or None."""
    if not SDBOX.exists():
        return f"no sdbox at {SDBOX}"
    check = subprocess.run([str(SDBOX), "check"], capture_output=True, text=True, check=False)
    if check.returncode:
        return f"sdbox cannot run here: {check.stdout.strip()} {check.stderr.strip()}"
    return None


@contextlib.contextmanager
def booted(tmp: Path, name: str) -> Iterator[Box]:
    """A box with cl's units, users and dirs; `tmp`/claude is its /opt/claude and `tmp`/fake its
    /srv/fake (where the fake CLIs keep their files). Yields `box(*cmd, check=True)`."""
    wheels = tmp / "wheels"
    shutil.rmtree(PROJECT / "build", ignore_errors=True)  # setuptools' build dir can hold removed modules
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), str(PROJECT)], check=True, capture_output=True
    )
    (tmp / "claude").mkdir()
    (tmp / "fake").mkdir()
    binds = {wheels: "/wheels:ro", tmp / "claude": "/opt/claude", FAKES: "/opt/fakes:ro", tmp / "fake": "/srv/fake"}
    subprocess.run(
        [
            str(SDBOX),
            "up",
            name,
            "--unit-dir",
            str(UNITS),
            "--sysusers-dir",
            str(UNITS / "sysusers.d"),
            "--tmpfiles-dir",
            str(UNITS / "tmpfiles.d"),
            *(arg for source, target in binds.items() for arg in ("--bind", f"{source}:{target}")),
        ],
        check=True,
        capture_output=True,
    )

    def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SDBOX), "exec", name, *cmd], capture_output=True, text=True, check=check)

    try:
        install(run)
        yield run
    finally:
        subprocess.run([str(SDBOX), "down", name], check=True, capture_output=True)


def install(box: Box) -> None:
    """As `make install` does (the units come with the box): the venv, and the journal's catalog
    from what the wheel carries."""
    box("/usr/bin/python3", "-m", "venv", "/opt/cl")
    box("/opt/cl/bin/pip", "install", "-q", "--no-index", "--find-links", "/wheels", "cl-roster")
    box("install", "-D", "-m", "0644", "/opt/cl/share/cl/catalog/cl.catalog", "/usr/lib/systemd/catalog/cl.catalog")
    box("journalctl", "--update-catalog")


def with_fake_cli(box: Box, **env: str) -> None:
    """The fake CLI as `claude_bin` in direct mode (it counts its quota itself), with these
    `[worker.env]` variables."""
    configure(box, 'claude_bin = "/opt/fakes/claude"\ngateway = false\n', env)


def cli_network(box: Box) -> str:
    """ "filtered" where systemd can apply the CLI's unit's IPAddressDeny= (the unified cgroup
    hierarchy), else "host": there every run would be refused, as it must."""
    unified = box("test", "-e", "/sys/fs/cgroup/cgroup.controllers", check=False).returncode == 0
    return "filtered" if unified else "host"


def configure(box: Box, settings: str, env: dict[str, str]) -> None:
    """/etc/cl/config.toml: `settings`, /srv/fake writable by the CLI, and these `[worker.env]`
    variables; /srv/work writable by the CLI's users (group cl-cli), /srv/fake (the fake's files:
    its log, a quota) too, and a log that is already there, which every one of them appends to."""
    config = (
        f'cli_network = "{cli_network(box)}"\n'
        + settings
        + 'cli_writable = ["/srv/fake"]\n[worker.env]\n'
        + "".join(f'{name} = "{value}"\n' for name, value in env.items())
    )
    box(
        "sh",
        "-c",
        "mkdir -p /etc/cl /srv/work && chgrp cl-cli /srv/work /srv/fake && chmod 2770 /srv/work /srv/fake"
        " && install -g cl-cli -m 0666 /dev/null /srv/fake/fake-claude.jsonl"
        f" && printf '%s' '{config}' > /etc/cl/config.toml",
    )


def drop_credential(box: Box, directory: Path, name: str, content: str) -> None:
    """As an operator would: owned by the box's `cl` user, mode 0600, landed by a rename."""
    uid = int(box("id", "-u", "cl").stdout)
    incoming = directory / ".incoming"
    incoming.write_text(content)
    os.chown(incoming, uid, uid)
    incoming.chmod(0o600)
    incoming.rename(directory / f"credentials-{name}.json")


def submit(box: Box, cwd: str, prompt: str, *user: str) -> int:
    """`cl submit` in the box (as `user`, with `setpriv` args, if given), which must succeed; the job id."""
    as_user = ["setpriv", *user] if user else []
    result = box(*as_user, "/opt/cl/bin/cl", "submit", "--cwd", cwd, "--prompt", prompt, "--json", check=False)
    assert result.returncode == 0, result.stderr + box("journalctl", "-u", "cl-balancer", "--no-pager").stdout[-3000:]
    return int(json.loads(result.stdout)["job"])


def journal(box: Box, unit: str) -> list[tuple[int, str]]:
    return [(int(e["PRIORITY"]), e["MESSAGE"]) for e in entries(box, "-u", unit) if isinstance(e.get("MESSAGE"), str)]


def entries(box: Box, *matches: str) -> list[dict[str, Any]]:
    """The journal's entries that `journalctl MATCHES...` shows, with all their fields."""
    out = box("journalctl", *matches, "-o", "json", "--no-pager").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]
