"""Where a job may run: its working directory, checked when it is submitted and again by its worker.

The CLI writes in its job's working directory with its own user's rights. So that directory
must be one the submitter could write themselves (a job is no way into another operator's
tree) and the CLI's user can write (or the job could not work), and never one of cl's own
places or a parent of one: not `/`, the state, sessions, runtime, credentials or configuration
directory. Permissions are read from the mode bits along the path (POSIX ACLs are not
consulted). Each refusal names the rule that failed.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from cl.config import Config

_SEARCH, _WRITE = 0o1, 0o2


class WorkdirRefused(Exception):
    """The directory breaks a rule; the message says which."""


@dataclasses.dataclass(frozen=True, slots=True)
class Writer:
    """Someone who must be able to write the directory: who, for the message, and their ids."""

    who: str
    uid: int
    groups: frozenset[int]


def private_dirs(config: Config) -> dict[str, Path]:
    """cl's own places: never a job's working directory, a parent or a child of one, and never
    readable by the CLI."""
    return {
        "state directory": config.state_dir,
        "sessions directory": config.sessions_dir,
        "runtime directory": config.runtime_dir,
        "credentials directory": config.credentials_dir,
    }


def check_for_job(config: Config, cwd: str, writers: Iterable[Writer]) -> str:
    """`check` with cl's places from `config` (and the configuration file's directory)."""
    holds = {"configuration directory": config.config_file.parent}
    return check(cwd, private_dirs(config), writers, holds=holds)


def check(cwd: str, private: Mapping[str, Path], writers: Iterable[Writer], holds: Mapping[str, Path] = {}) -> str:
    """The directory, resolved; raises WorkdirRefused naming the rule it breaks. It must not be
    nor hold nor be inside any of `private`, and must not be nor hold any of `holds`."""
    resolved = os.path.realpath(cwd)
    try:
        st = os.stat(resolved)
    except OSError:
        raise WorkdirRefused(f"{cwd}: no such directory (as cl sees it)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise WorkdirRefused(f"{cwd}: not a directory")
    if resolved == "/":
        raise WorkdirRefused(f"{cwd}: the root directory is never a job's working directory")
    for what, path in {**holds, **private}.items():
        place = os.path.realpath(path)
        if resolved == place:
            raise WorkdirRefused(f"{cwd}: it is cl's {what}")
        if _beneath(place, resolved):
            raise WorkdirRefused(f"{cwd}: it holds cl's {what} ({place})")
        if what in private and _beneath(resolved, place):
            raise WorkdirRefused(f"{cwd}: it is inside cl's {what} ({place})")
    for writer in writers:
        _writable(resolved, writer)
    return resolved


def _beneath(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def _writable(directory: str, writer: Writer) -> None:
    parts = Path(directory).parts
    for depth in range(1, len(parts)):
        ancestor = str(Path(*parts[:depth]))
        if not _may(os.stat(ancestor), writer, _SEARCH):
            raise WorkdirRefused(f"{directory}: {writer.who} cannot reach it ({ancestor} is closed to them)")
    if not _may(os.stat(directory), writer, _SEARCH | _WRITE):
        raise WorkdirRefused(f"{directory}: {writer.who} cannot write it")


def _may(st: os.stat_result, writer: Writer, wanted: int) -> bool:
    if writer.uid == 0:
        return True
    if st.st_uid == writer.uid:
        bits = st.st_mode >> 6
    elif st.st_gid in writer.groups:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & wanted == wanted
