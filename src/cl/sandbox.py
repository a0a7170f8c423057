"""The CLI's view of the machine: a mount namespace per run, built by bubblewrap (`bwrap`).

The CLI runs whatever a repository steers it to, so it gets a root of its own (`view`):

* the system read-only: /usr (and the /bin, /lib... beside it), /etc, /opt and /var, less cl's
  own places, which are empty there, read-only and not listable (the state, sessions, runtime
  and credentials directories); `cli_readable` adds more (an install under /home);
* read-write: its job's directory and its config dir, each bound from the descriptor the worker
  opened (`open_directory`: no symlink followed), and checked in the view before the CLI starts
  (`PINNED`), so the path inside names that directory for the CLI's whole life, whatever becomes
  of the path outside; and `cli_writable`;
* a private /tmp, /var/tmp, /run (only the resolver's file from the real one) and /dev;
* its own PID namespace (everything in it ends with it) with a /proc of its own where the kernel
  lets one be mounted (`probe`; where it does not, as in a systemd unit that masks parts of /proc,
  the host's, read-only: with `ProtectProc=invisible` the CLI's user sees its own processes only),
  and its own System V IPC. The network is the host's (the gateway is on loopback), or with
  `cli_network = "gateway"` one of its own, loopback only, where `cl.relay` (its source an
  argument of the view's python3) takes the CLI's requests to the gateway's socket for the CLIs.

Everything else, other operators' trees included, does not exist for it. bwrap sets this up in a
user namespace as the pool user the CLI runs as (`cl.cli_user`), without privileges of its own;
the CLI starts once the view is complete, or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Self

SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/var")
"""The system, read-only in every view (where it exists; a symlink stays one)."""
PRIVATE_TMP = ("/tmp", "/var/tmp", "/run")  # noqa: S108 - the view's own, empty
RESOLVER = "/etc/resolv.conf"
NAMESPACES = ("--unshare-user", "--unshare-pid", "--unshare-ipc")
"""With the mount namespace bwrap always makes: what the view needs, and what the worker unit allows
(RestrictNamespaces=); a host name or a cgroup view of its own would add nothing."""

PINNED = (
    'test "$(stat -c %d:%i .)" = "$1" || { echo "cl: the view does not hold the job\'s directory" >&2; exit 125; }\n'
    'shift\nexec "$@"\n'
)
"""Run in the view before the CLI: its cwd must be the directory the worker opened (device and
inode, the script's first argument). bwrap binds a descriptor by the path the kernel gives for it,
resolved again as it builds the view: a swap in that instant would bind another directory. Then
the CLI does not start."""
GATEWAY_DIR = "/run/cl-gateway"
"""Where a view with a network of its own has the directory of the gateway's socket for the CLIs."""
RELAY = Path(__file__).with_name("relay.py").read_text()
"""The relay's source, run with `python3 -c` in such a view (nothing of cl is there)."""
PYTHON = "/usr/bin/python3"
"""The interpreter the relay runs on in the view (the system's)."""

PROBE_TIMEOUT = 30.0
"""Seconds an empty view may take to build (a few ms): a half-killed bwrap holds its pipes forever."""

_PATH = os.O_PATH | os.O_CLOEXEC


class SandboxUnavailable(Exception):
    """No view can be built here; the message says why and what to do."""


def bwrap() -> str:
    """bwrap's path; raises SandboxUnavailable if it is not installed."""
    if (path := shutil.which("bwrap", path=os.environ.get("PATH", os.defpath) + ":/usr/bin:/bin")) is None:
        raise SandboxUnavailable("bubblewrap is not installed (apt install bubblewrap), or set confinement = 'none'")
    return path


def probe(preexec: Callable[[], None] | None = None) -> bool:
    """Build an empty view and run nothing in it, as the caller (or as `preexec` makes it): True
    if it can have a /proc of its own, False if only the host's can be bound (a procfs mount is
    refused where /proc is partly masked, as in a systemd unit with ProtectKernelTunables=).
    Raises SandboxUnavailable, with bwrap's own words, if no view can be built (no user namespaces)."""
    with Probe(preexec, at_once=False) as probing:
        return probing.own_proc()


PROC_VIEWS = {True: ("--proc", "/proc"), False: ("--ro-bind", "/proc", "/proc")}
"""A view's /proc: its own (`own_proc`), else the host's, read-only; a probe tries them in this order."""


class Probe:
    """`probe`, asked ahead of when its answer is needed: `at_once`, both empty views are built
    from the start (else the second only if the first cannot be), and `own_proc` waits for what
    they said. Leaving the `with` block ends what still runs."""

    def __init__(self, preexec: Callable[[], None] | None = None, *, at_once: bool = True) -> None:
        self._command = bwrap()
        self._preexec = preexec
        self._tries: list[subprocess.Popen[str]] = []
        try:
            for _ in range(len(PROC_VIEWS) if at_once else 1):
                self._try_next()
        except BaseException:
            self.__exit__()
            raise

    def _try_next(self) -> None:
        proc = list(PROC_VIEWS.values())[len(self._tries)]
        self._tries.append(
            subprocess.Popen(  # a session of its own: a Ctrl-C at a daemon's terminal cannot kill it half-built
                [self._command, *NAMESPACES, "--die-with-parent", "--ro-bind", "/", "/", *proc, "--", "/usr/bin/true"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=self._preexec,  # noqa: PLW1509 - a change of user only
                start_new_session=True,
            )
        )

    def own_proc(self) -> bool:
        """True if the view may have a /proc of its own, False if only the host's; raises
        SandboxUnavailable if neither view could be built."""
        said = []
        for number, own in enumerate(PROC_VIEWS):
            if number == len(self._tries):
                self._try_next()
            built = self._tries[number]
            try:
                _, stderr = built.communicate(timeout=PROBE_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise SandboxUnavailable(f"bubblewrap built no empty view in {PROBE_TIMEOUT:g} s") from None
            if built.returncode == 0:
                return own
            said.append(stderr.strip() or f"exit status {built.returncode}")
        raise SandboxUnavailable(f"bubblewrap cannot build the CLI's view here: {said[0]}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        """Waits for what still runs (milliseconds): a bwrap killed half-built leaves the first
        process of its namespaces waiting for it, holding its pipe. One stuck past the bound is
        killed where we may (`--die-with-parent` takes that process along), else left to its unit."""
        for built in self._tries:
            try:
                built.communicate(timeout=PROBE_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    built.kill()


def check_network(cli_network: str) -> None:
    """Raises SandboxUnavailable if the CLI's network, started from here, would not be what
    `cli_network` says: "filtered" holds only where this process cannot reach loopback (the
    IPAddressDeny= of the unit the CLI runs in applies to it as to us)."""
    if cli_network == "filtered" and loopback_reachable():
        raise SandboxUnavailable(
            "cli_network = 'filtered', but loopback is reachable from here: no cl-cli@ unit narrows the"
            " network, or systemd cannot apply its IPAddressDeny= on these cgroups; set cli_network = 'gateway'"
            " (a network of its own) or 'host' (the host's, unnarrowed)"
        )


def loopback_reachable() -> bool:
    """Whether this process can open a connection to a listener of its own on 127.0.0.1: a
    `cl-cli@` unit's IPAddressDeny= refuses it (EPERM) wherever systemd could apply it, and the
    CLI, in the same unit, is refused as its starter is."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.socket() as probe:
            probe.settimeout(5)
            try:
                probe.connect(listener.getsockname())
            except OSError:
                return False
            return True


def open_directory(path: str) -> int:
    """An `O_PATH` descriptor of the directory at `path` (absolute), reached without following any
    symlink: each component is opened beneath the one before with `O_NOFOLLOW` (as `openat2`'s
    RESOLVE_NO_SYMLINKS would, which systemd 252's seccomp filters do not know). Raises OSError
    (ELOOP for a symlink on the way)."""
    fd = os.open("/", _PATH)
    for part in Path(path).parts[1:]:
        fd = _step(fd, part, path)
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.ENOTDIR, "not a directory", path)
    return fd


def _step(parent: int, part: str, path: str) -> int:
    """`part` opened beneath `parent` (which is closed), if it is not a symlink."""
    try:
        fd = os.open(part, _PATH | os.O_NOFOLLOW, dir_fd=parent)
    finally:
        os.close(parent)
    if stat.S_ISLNK(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.ELOOP, "a symlink is on the way", path)
    return fd


@dataclasses.dataclass(frozen=True, slots=True)
class View:
    """What one run's CLI sees besides the system."""

    cwd: tuple[int, str]
    """The job's directory: the descriptor the worker opened, and its path (where it appears)."""
    config_dir: tuple[int, str]
    hidden: Sequence[str]
    """cl's own places: empty directories in the view."""
    readable: Sequence[str] = ()
    writable: Sequence[str] = ()
    own_proc: bool = True
    """A /proc of its own PID namespace; False: the host's, read-only (`probe`)."""
    gateway_only: int | None = None
    """A network of its own, loopback only: the descriptor of the directory of the gateway's
    socket for the CLIs (named `gateway_socket`), where the relay (`cl.relay`) takes its requests."""
    gateway_socket: str = ""


def argv(view: View, command: Sequence[str], address: str = "") -> list[str]:
    """bwrap's command line running `command` in `view` (pass its descriptors to it); with a
    network of its own, through the relay listening on `address` (the gateway's)."""
    hidden = _existing(view.hidden)
    args = [bwrap(), *NAMESPACES, "--die-with-parent", *_system()]
    args += PROC_VIEWS[view.own_proc]
    args += ["--dev", "/dev", *_each(["--tmpfs"], PRIVATE_TMP)]
    args += _each(["--perms", "0111", "--tmpfs"], hidden)  # passable (to a config dir bound beneath), not listable
    if (resolver := os.path.realpath(RESOLVER)).startswith("/run/"):  # systemd-resolved's stub
        args += ["--ro-bind-try", resolver, resolver]
    args += _each(["--ro-bind"], _existing(view.readable), twice=True)
    args += _each(["--bind"], _existing(view.writable), twice=True)
    for fd, path in (view.cwd, view.config_dir):
        args += ["--bind-fd", str(fd), path]
    args += _each(["--remount-ro"], hidden)  # what is bound beneath stays as it was bound
    opened = os.fstat(view.cwd[0])
    command = ["/bin/sh", "-c", PINNED, "sh", f"{opened.st_dev}:{opened.st_ino}", *command]
    if view.gateway_only is not None:
        args += ["--unshare-net", "--ro-bind-fd", str(view.gateway_only), GATEWAY_DIR]
        socket = f"{GATEWAY_DIR}/{view.gateway_socket}"
        command = [PYTHON, "-c", RELAY, address, socket, "--", *command]
    return [*args, "--chdir", view.cwd[1], "--", *command]


def _system() -> list[str]:
    args = []
    for path in SYSTEM:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _each(flags: Sequence[str], paths: Iterable[str], *, twice: bool = False) -> list[str]:
    """`flags` before each path, and the path once (or twice: source and target)."""
    return [arg for path in paths for arg in (*flags, path, *([path] if twice else []))]


def _existing(paths: Iterable[str]) -> list[str]:
    """Real paths that exist, each once, parents before children (a bind under a tmpfs shows)."""
    real = {os.path.realpath(path) for path in paths if os.path.exists(path)}
    return sorted(real, key=lambda path: (len(Path(path).parts), path))
