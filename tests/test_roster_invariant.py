"""The seed's invariant: both daemons always agree with the directory, and so with each other.

Two real daemon processes watch one temp directory while hypothesis churns it: adds, removes,
in-place rewrites, atomic replaces, renames, editor temp files, bad files, directories named
like credentials. After each burst (a quiet point) both `accounts` replies must equal what the
directory says now, worked out here from the files themselves, not from a list of names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils import (
    DaemonProcess,
    Layout,
    Planted,
    api_key_credential,
    both,
    cl,
    oauth_credential,
    wait_until,
    write_credential,
)

NAMES = ["a", "b", "c", "d", "e", "f"]
MIN_OPERATIONS = 1_000


def expected_states(directory: Path) -> dict[str, str]:
    """The oracle: what each credential-named entry in the directory is, read from disk now."""
    states = {}
    for entry in os.scandir(directory):
        match = re.fullmatch(r"credentials-([A-Za-z0-9][A-Za-z0-9_-]{0,63})\.json", entry.name)
        if match is None:
            continue
        if not entry.is_file(follow_symlinks=False):
            states[match.group(1)] = "invalid"
            continue
        try:
            doc = json.loads(Path(entry.path).read_bytes())
        except ValueError:
            states[match.group(1)] = "invalid"
            continue
        token = doc["claudeAiOauth"]["accessToken"] if "claudeAiOauth" in doc else doc.get("apiKey")
        states[match.group(1)] = "ok" if token else "needs-login"
    return states


def make_content(planted: Planted, kind: str) -> str:
    match kind:
        case "oauth":
            return oauth_credential(planted)
        case "api-key":
            return api_key_credential(planted)
        case "blanked":
            return json.dumps({"claudeAiOauth": {"accessToken": "", "expiresAt": 0}})
        case "garbage":
            return '{"claudeAiOauth": {"accessTok'
    return ""


CONTENT = st.sampled_from(["oauth", "oauth", "api-key", "blanked", "garbage", "empty"])
OPERATION = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(NAMES), CONTENT),
    st.tuples(st.just("replace"), st.sampled_from(NAMES), CONTENT),
    st.tuples(st.just("remove"), st.sampled_from(NAMES), st.just("")),
    st.tuples(st.just("rename"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("editor"), st.sampled_from(NAMES), CONTENT),
    st.tuples(st.just("mkdir"), st.sampled_from(NAMES), st.just("")),
)


def apply(directory: Path, planted: Planted, operation: tuple[str, str, str]) -> None:  # noqa: C901 - a case a verb
    verb, name, arg = operation
    path = directory / f"credentials-{name}.json"
    if path.is_dir() and verb not in ("remove", "mkdir"):
        return
    match verb:
        case "write":  # in place: readers can see it truncated, half written, then whole
            path.write_text(make_content(planted, arg))
        case "replace":  # temp file + rename, as `install` or an atomic writer does
            tmp = directory / f".{path.name}.{uuid.uuid4().hex[:6]}"
            tmp.write_text(make_content(planted, arg))
            tmp.replace(path)
        case "remove":
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        case "rename":
            target = directory / f"credentials-{arg}.json"
            if path.is_file() and not target.is_dir():
                path.rename(target)
        case "editor":  # swap files, backups and temp names that are not credentials
            for junk in (f".{path.name}.swp", f"{path.name}~", "4913", f".#{path.name}"):
                (directory / junk).write_text(make_content(planted, arg))
        case "mkdir":
            if not path.exists():
                path.mkdir()


def churner(
    layout: Layout, planted: Planted, daemons: tuple[DaemonProcess, DaemonProcess], bursts: int, size: int
) -> tuple[Callable[[], None], list[int]]:
    """A hypothesis run of `bursts` bursts of `size` to `2 * size` operations; after each burst both
    daemons must show what the directory says. Also the list of burst lengths applied."""
    applied: list[int] = []

    @settings(
        max_examples=bursts,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(st.lists(OPERATION, min_size=size, max_size=2 * size))
    def churn(operations: list[tuple[str, str, str]]) -> None:
        for operation in operations:
            apply(layout.credentials, planted, operation)
        applied.append(len(operations))
        expected = expected_states(layout.credentials)
        agree: Callable[[], bool] = lambda: all(d.file_states() == expected for d in daemons)  # noqa: E731
        wait_until(agree, f"both daemons to show {expected}")

    return churn, applied


def test_both_daemons_always_agree_with_the_directory(
    layout: Layout, planted: Planted, daemons: tuple[DaemonProcess, DaemonProcess]
) -> None:
    churn, applied = churner(layout, planted, daemons, bursts=100, size=15)
    churn()
    assert sum(applied) >= MIN_OPERATIONS
    final = expected_states(layout.credentials)
    wait_until(lambda: daemons[0].file_states() == daemons[1].file_states() == final, "the final agreement")


def test_directory_deleted_and_recreated_both_daemons_follow(
    layout: Layout, planted: Planted, daemons: tuple[DaemonProcess, DaemonProcess]
) -> None:
    write_credential(layout.credentials, "a", oauth_credential(planted))
    wait_until(lambda: all(d.file_states() == {"a": "ok"} for d in daemons), "both daemons to see a")
    shutil.rmtree(layout.credentials)
    wait_until(lambda: all(d.file_states() == {} for d in daemons), "both daemons to drop a with its directory")
    layout.credentials.mkdir()
    write_credential(layout.credentials, "b", oauth_credential(planted))
    wait_until(
        lambda: all(d.file_states() == {"b": "ok"} for d in daemons), "both daemons to see b in the new directory"
    )
    for daemon in daemons:
        assert "credentials directory unavailable" in daemon.log()
        assert "credentials directory available" in daemon.log()


def test_both_daemons_agree_while_sessions_wall_and_move(layout: Layout, planted: Planted) -> None:
    """Churn the roster while sessions run, wall and are rescued onto accounts that come and go."""
    layout.quota({"*": 0})  # every account walls at its first request, for a second: sessions keep moving
    env = layout.env(FAKE_CLAUDE_RESET_IN="1", CL_WALL_RETRY="1", CL_RESET_JITTER="0.1")
    with both(layout, env=env) as daemons:
        for i in range(8):
            cl(layout, "submit", "--cwd", str(layout.work), "--prompt", f"task {i}")

        churn, _ = churner(layout, planted, daemons, bursts=15, size=10)
        for _ in range(40):  # churn on until sessions have moved a few times under it
            churn()
            if (moves := daemons[1].log().count("session moved")) >= 5:
                break
        layout.quota({})  # a healthy account at last: everything still waiting finishes on it
        write_credential(layout.credentials, "zz", oauth_credential(planted))
        wait_until(lambda: settled(layout), "every job to be done or failed with a reason", timeout=60)
        assert moves >= 5
        assert cl(layout, "accounts").returncode == 0


def settled(layout: Layout) -> bool:
    jobs = json.loads(cl(layout, "jobs", "--all", "--json").stdout)
    return all(job["state"] == "done" or (job["state"] == "failed" and job["error"]) for job in jobs)
