"""The worker's claim -> the CLI running, side by side with another revision in one run.

`python bench/launch.py [--against REV] [--jobs N] [--rounds R]`, as root (the CLI gets a user of
its own only then). REV (default: the commit before the sandbox) is checked out in a temporary
worktree; each round runs N jobs one after another on this tree's daemons, then on REV's, each
on a fresh root. A job's figure is from its run's claim (the ledger's `run started`) to the fake
CLI's first line of work (its own interpreter start included, the same on both sides). This tree
runs its CLIs sandboxed (a pool user, a bubblewrap view); REV runs them as it did. With
`--starter`, the jobs run as under systemd: on both sides each worker is a fresh `cl-worker
--from-socket` behind a socket (`cl-worker.socket`), and this tree's CLIs are started each by a
`cl-cli-starter` of its own behind another (`cl-cli.socket`); both sockets are played as the tests
play them, so systemd's own start of a unit is not in the figure. With `--systemd`, each side runs
its own units and wheel under a real systemd 252 (PID 1 in a box, each tree's `tests/sdbox.py`),
as `systemctl enable --now cl-balancer` would: systemd's unit starts are in the figure.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import grp
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import sdbox
from run import BIN, CREDENTIAL, populate, spread, wait_for

from cl.client import call
from utils import cli_socket, worker_socket

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
FAKE_CLAUDE = PROJECT / "tests" / "fakes" / "claude"
BEFORE_THE_SANDBOX = "1d8a64d"
CLAIMS = (
    "import json, pathlib, sys; from cl.store import Store; s = Store(pathlib.Path(sys.argv[1]));"
    " print(json.dumps([e['at'] for e in s.ledger(1_000_000) if e['event'] == 'run started']))"
)
"""When each run was claimed, in order, as the tree's own store reads its ledger (its schema): the
database's path is the argument."""


def claim_to_running(
    tree: Path, root: Path, jobs: int, *, socket_workers: bool = False, starter: bool = False
) -> list[float]:
    """`jobs` jobs, one at a time, on the daemons of `tree`'s source, on `root` (`socket_workers`:
    each worker behind a played `cl-worker.socket`; `starter`: each CLI started by a `cl-cli-starter`)."""
    populate(root / "claude", 2)
    work, fakes = root / "work", root / "fake"
    for directory in (work, fakes):
        directory.mkdir()
        os.chown(directory, -1, grp.getgrnam("cl-cli").gr_gid)  # writable by the CLI's users, old and new
        directory.chmod(0o2777)
    log = fakes / "fake.jsonl"
    log.touch(mode=0o666)
    log.chmod(0o666)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CL_", "NOTIFY_SOCKET"))}
    env |= {
        "PYTHONPATH": str(tree / "src"),
        "CL_CONFIG": "/dev/null",
        "CL_CREDENTIALS_DIR": str(root / "claude"),
        "CL_STATE_DIR": str(root / "state"),
        "CL_SESSIONS_DIR": str(root / "sessions"),
        "CL_RUNTIME_DIR": str(root / "run"),
        "CL_GATEWAY": "false",
        "CL_CLAUDE_BIN": str(FAKE_CLAUDE),
        "CL_CLI_WRITABLE": str(fakes),
        "FAKE_CLAUDE_LOG": str(log),
    }
    if "confinement" in (tree / "src" / "cl" / "config.py").read_text():  # a tree with the sandbox
        env |= {"CL_CONFINEMENT": "sandbox", "CL_CLI_READABLE": str(FAKE_CLAUDE.parent), "CL_CLI_ENV_KEEP": "FAKE_*"}
        env |= {"CL_CLI_NETWORK": "host"} if "cli_network" in (tree / "src" / "cl" / "config.py").read_text() else {}
    else:  # one before it: its own user, cl-cli, and Landlock
        env |= {"CL_CLI_USER": "cl-cli-16"}  # a user of its own: the pool's last, which this tree leaves alone here
    with contextlib.ExitStack() as stack:
        (root / "run").mkdir(mode=0o755)
        if socket_workers:
            stack.enter_context(worker_socket(str(root / "run" / "worker.sock"), env, root / "workers.log"))
        if starter:
            env["CL_CLI_STARTER"] = str(root / "run" / "starter.sock")
            stack.enter_context(cli_socket(env["CL_CLI_STARTER"], env, root / "starter.log"))
        submit_one_by_one(env, root, work, log, jobs)
    running = [json.loads(line)["t"] for line in log.read_text().splitlines()]
    claimed = ledger_claims(tree, root / "state" / "cl.db")
    return [start - claim for claim, start in zip(claimed, running, strict=True)]


def submit_one_by_one(env: dict[str, str], root: Path, work: Path, log: Path, jobs: int) -> None:
    """`jobs` jobs on a balancer of `env`'s, each once the one before runs its CLI."""
    balancer = subprocess.Popen(
        [str(BIN / "python"), "-c", "from cl.balancer import main; main()"],
        env=env,
        stderr=(root / "balancer.log").open("wb"),
    )
    try:
        socket_path = root / "run" / "balancer.sock"
        wait_for(socket_path.exists, "the balancer to listen")
        for i in range(jobs):
            call(socket_path, {"request": "submit", "cwd": str(work), "prompt": f"p{i}"})
            wait_for(functools.partial(started, log, i + 1), f"job {i}'s CLI to run")
            time.sleep(0.05)  # its worker settles before the next claim
    finally:
        balancer.terminate()
        balancer.wait(30)


def under_systemd(tree: Path, root: Path, jobs: int) -> list[float]:
    """`jobs` jobs, one at a time, on `tree`'s units and wheel in a booted systemd, set up by
    `tree`'s own `tests/sdbox.py` (its units' and configuration's own way)."""
    spec = importlib.util.spec_from_file_location(f"sdbox_{abs(hash(tree))}", tree / "tests" / "sdbox.py")
    assert spec is not None
    assert spec.loader is not None
    box_of_tree = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(box_of_tree)
    vars(box_of_tree)["SDBOX"] = sdbox.SDBOX  # the box tool beside this tree, wherever `tree` is checked out
    with box_of_tree.booted(root, f"clbench{os.getpid()}") as box:
        box_of_tree.with_fake_cli(box, FAKE_CLAUDE_LOG="/srv/fake/fake-claude.jsonl")
        box("systemctl", "enable", "--now", "cl-balancer.service")
        for i in range(2):
            box_of_tree.drop_credential(box, root / "claude", f"a{i}", CREDENTIAL)
        wait_for(lambda: "a1" in box("/opt/cl/bin/cl", "status", check=False).stdout, "the accounts to show")
        log = root / "fake" / "fake-claude.jsonl"
        for i in range(jobs):
            box_of_tree.submit(box, "/srv/work", f"p{i}")
            wait_for(functools.partial(started, log, i + 1), f"job {i}'s CLI to run")
            time.sleep(0.05)  # its worker settles before the next claim
        claimed = json.loads(box("/opt/cl/bin/python", "-c", CLAIMS, "/var/lib/cl/cl.db").stdout)
    running = [json.loads(line)["t"] for line in log.read_text().splitlines()]
    return [start - claim for claim, start in zip(claimed, running, strict=True)]


def ledger_claims(tree: Path, database: Path) -> list[float]:
    """When each run was claimed, in order, read by `tree`'s own store (its schema)."""
    out = subprocess.run(
        [str(BIN / "python"), "-c", CLAIMS, str(database)],
        env={**os.environ, "PYTHONPATH": str(tree / "src")},
        check=True,
        capture_output=True,
        text=True,
    )
    return list(json.loads(out.stdout))


def started(log: Path, count: int) -> bool:
    return len(log.read_text().splitlines()) >= count


@contextlib.contextmanager
def worktree(revision: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cl-bench-rev-") as tmp:
        path = Path(tmp) / "tree"
        git = ["git", "-C", str(PROJECT), "worktree"]
        subprocess.run([*git, "add", "-q", "--detach", str(path), revision], check=True)
        try:
            yield path
        finally:
            subprocess.run([*git, "remove", "--force", str(path)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default=BEFORE_THE_SANDBOX, help="the revision to compare with")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--starter",
        action="store_true",
        help="as under systemd: workers behind a socket, this tree's CLIs by a starter",
    )
    parser.add_argument("--systemd", action="store_true", help="each side's own units under a real systemd (a box)")
    args = parser.parse_args()
    if args.systemd and (why := sdbox.unavailable()):
        raise SystemExit(why)
    if os.getuid() != 0:
        raise SystemExit("run as root: the CLI gets a user of its own only then")
    subprocess.run(["systemd-sysusers", str(PROJECT / "packaging/systemd/sysusers.d/cl.conf")], check=True)
    with worktree(args.against) as other:
        figures: dict[str, list[float]] = {"this tree": [], args.against: []}
        for _ in range(args.rounds):
            for name, tree in (("this tree", PROJECT), (args.against, other)):
                with tempfile.TemporaryDirectory(prefix="cl-bench-launch-", dir="/var/tmp") as root:
                    Path(root).chmod(0o755)
                    if args.systemd:
                        figures[name] += under_systemd(tree, Path(root), args.jobs)
                        continue
                    starter = args.starter and tree == PROJECT
                    figures[name] += claim_to_running(
                        tree, Path(root), args.jobs, socket_workers=args.starter, starter=starter
                    )
    for name, samples in figures.items():
        print(f"claim -> CLI running, {name}: {spread(samples)}  (n={len(samples)})")


if __name__ == "__main__":
    main()
