"""`cl`: the command line. It finds the daemons through the same configuration they use.

Exit codes: 0 fine, 1 the daemons disagree, 2 usage or configuration error (or a request
the daemon refused), 3 a daemon is unreachable (or its state store is), 4 no such job, session
or account (or no result yet); `cl wait` and `cl result`: 5 the job failed, 6 it was cancelled;
`cl wait --timeout`: 7 it had not ended.
"""

from __future__ import annotations

import argparse
import calendar
import collections
import contextlib
import datetime as dt
import errno
import importlib.metadata
import io
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cl.client import MAX_PROMPT_BYTES, DaemonUnreachable, call
from cl.config import Config, ConfigError, load_config
from cl.moments import span
from cl.states import JobState, RunState
from cl.windows import Window, first_since_wall

DAEMONS = ("balancer", "rescue")
EXIT_DIFFER = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 4
EXIT_FAILED = 5
EXIT_CANCELLED = 6
EXIT_TIMED_OUT = 7
EXIT_BLOCKED = 8


class CommandError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def ask(config: Config, daemon: str, request: dict[str, Any]) -> dict[str, Any]:
    try:
        reply = call(config.socket_path(daemon), request)
    except DaemonUnreachable as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise CommandError(
                f"cl-{daemon}: permission denied at {config.socket_path(daemon)}: only root and members of group cl"
                " may talk to the daemons (sudo usermod -aG cl $USER, then log in again)",
                EXIT_UNREACHABLE,
            ) from None
        raise CommandError(f"cl-{daemon} is unreachable ({exc}); is it running?", EXIT_UNREACHABLE) from None
    if not reply.get("ok"):
        code = {"not-found": EXIT_NOT_FOUND, "unavailable": EXIT_UNREACHABLE}.get(str(reply.get("code")), EXIT_USAGE)
        raise CommandError(f"cl-{daemon}: {reply.get('error')}", code)
    return reply


def cmd_accounts(config: Config, args: argparse.Namespace) -> int:
    daemons = (args.source,) if args.source else DAEMONS
    with ThreadPoolExecutor() as pool:  # both daemons at once: at 10,000 accounts each takes a while
        asked = {daemon: pool.submit(ask, config, daemon, {"request": "accounts"}) for daemon in daemons}
        if not args.source:
            asked["settings"] = pool.submit(ask, config, "balancer", {"request": "settings"})
            asked["fleet"] = pool.submit(_fleet, config)
        answers = {key: future.result() for key, future in asked.items()}
    views = {daemon: answers[daemon]["accounts"] for daemon in daemons}
    if args.source:  # the roster as that daemon's registry reads it: each credential file's state
        if args.json:
            print_json(views[args.source])
        else:
            print_table(
                ["ACCOUNT", "FILE", "KIND", "EXPIRES", "REASON"],
                [
                    [a["name"], a["file"], a["kind"] or "-", a["expires_at"] or "-", a["reason"] or ""]
                    for a in views[args.source]
                ],
            )
    else:
        accounts = _accounts(views, answers["settings"], answers["fleet"])
        ignored = answers["balancer"].get("ignored", [])
        if args.json:
            print_json({"accounts": accounts, **views, "ignored": ignored, "fleet": answers["fleet"]})
        else:
            in_fleet, now = _live_hosts(answers["fleet"]) > 1, time.time()  # a fleet: each account's home too
            print_table(
                [
                    "ACCOUNT",
                    "STATE",
                    *(["HOME"] if in_fleet else []),
                    "KIND",
                    "EXPIRES",
                    "5H",
                    "7D",
                    "SETTINGS",
                    "REASON",
                ],
                [
                    [
                        a["name"],
                        _account_state(a, now),
                        *([a["home"]] if in_fleet else []),
                        a["kind"] or "-",
                        _expires(a["expires_at"], now),
                        *(_window(a, period, now, read=True) for period in ("five_hour", "seven_day")),
                        _settings(a["settings"]),
                        a["reason"] or "",
                    ]
                    for a in accounts
                ],
            )
            if ignored:
                print()
            for file in ignored:
                print(shown(f"ignored: {file['file']}: not a credential file's name; call it {file['rename_to']}"))
    if len(views) > 1 and (differences := describe_differences(views)):
        print("\nWARNING: cl-balancer and cl-rescue see different accounts:", file=sys.stderr)
        for line in differences:
            print(f"  {line}", file=sys.stderr)
        return EXIT_DIFFER
    return 0


def _accounts(
    views: dict[str, list[dict[str, Any]]], settings: dict[str, Any], fleet: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every account a daemon sees, set for or served elsewhere in the fleet, as one object: its
    one state (the balancer's), its file, its windows, its settings and its home."""
    here = fleet["host"]
    homes = {a["name"]: h["name"] for h in fleet["hosts"] if h["live"] and h["name"] != here for a in h["accounts"]}
    files = {a["name"]: a for view in views.values() for a in view}
    states, windows = settings["states"], settings["windows"]
    set_for = {s["account"]: s for s in settings["settings"]}
    accounts = []
    for name in sorted(files.keys() | set_for.keys() | homes.keys()):
        file = files.get(name, {})
        if name in states:
            state = states[name]
        elif file:  # only cl-rescue sees it
            state = {"state": file["file"], "reason": file["reason"], "window": None, "walled_until": None}
        elif name in homes:
            state = {
                "state": "elsewhere",
                "reason": f"an account of {homes[name]}",
                "window": None,
                "walled_until": None,
            }
        else:
            reason = "no credential file: its settings wait for one"
            state = {"state": "absent", "reason": reason, "window": None, "walled_until": None}
        accounts.append(
            {
                "name": name,
                **state,
                "home": here if file else homes.get(name, "-"),
                "kind": file.get("kind"),
                "expires_at": file.get("expires_at"),
                "windows": windows.get(name, {}),
                "settings": set_for.get(name),
            }
        )
    return accounts


def _expires(iso: str | None, now: float) -> str:
    """When a token expires, relative: `in 7h12m`, `2d3h ago`."""
    if iso is None:
        return "-"
    seconds = dt.datetime.fromisoformat(iso).timestamp() - now
    return f"in {span(seconds)}" if seconds >= 0 else f"{span(-seconds)} ago"


def cmd_doctor(config: Config, args: argparse.Namespace) -> int:
    """The balancer's checks (run in its environment, which its CLIs get), or this process's own
    if it does not answer; then whether each daemon, and the gateway's port for the CLIs, answers."""
    from cl import doctor  # noqa: PLC0415 - what only this command needs

    config = load_config()  # every key: the checks read where things are
    try:
        reply = ask(config, "balancer", {"request": "doctor"})
        found, where = [doctor.Finding(**f) for f in reply["findings"]], f"cl-balancer, as {reply['user']}"
    except CommandError as exc:
        if exc.code != EXIT_UNREACHABLE:
            raise
        found = [doctor.Finding("cl-balancer", False, str(exc), "systemctl start cl-balancer", True)]
        found += doctor.environment(config, workers_switch=True) + doctor.ignored(config.credentials_dir)
        where = f"this process, as {doctor.whoami()} (cl-balancer does not answer)"
    for daemon in ("rescue", *(["gateway"] if config.gateway else [])):
        try:
            ask(config, daemon, {"request": "accounts", "names": []})
            found.append(doctor.Finding(f"cl-{daemon}", True, "answers"))
        except CommandError as exc:
            found.append(doctor.Finding(f"cl-{daemon}", False, str(exc), f"systemctl start cl-{daemon}", True))
    if config.gateway:
        found.append(doctor.gateway_port(config))
    if args.json:
        print_json({"checked_by": where, "findings": [finding.public() for finding in found]})
    else:
        mark = {True: "ok", False: "warn"}
        print_table(
            ["", "CHECK", "FOUND"],
            [["FAIL" if f.blocks else mark[f.ok], f.check, f.told()] for f in found],
        )
        print(f"\nchecked by {where}")
    return EXIT_BLOCKED if doctor.blocking(found) else 0


def cmd_complete(config: Config, args: argparse.Namespace) -> int:
    """What shell completion offers: job ids (yours, finished ones too) or account names, one a line."""
    if args.what == "jobs":
        reply = ask(config, "balancer", {"request": "status", "finished": True})
        print("\n".join(str(job["id"]) for job in reversed(reply["jobs"])))
    else:
        reply = ask(config, "balancer", {"request": "accounts"})
        print("\n".join(account["name"] for account in reply["accounts"]))
    return 0


COMPLETION = {
    "bash": '_cl_jobs() { compgen -W "$(cl complete jobs 2>/dev/null)" -- "$1"; }\n'
    '_cl_accounts() { compgen -W "$(cl complete accounts 2>/dev/null)" -- "$1"; }\n',
    "zsh": '_cl_jobs() { compadd -- ${(f)"$(cl complete jobs 2>/dev/null)"} }\n'
    '_cl_accounts() { compadd -- ${(f)"$(cl complete accounts 2>/dev/null)"} }\n',
}
"""What the generated completions begin with (`make generate`): job ids and account names asked
of the daemons as one completes them."""
JOBS = {"bash": "_cl_jobs", "zsh": "_cl_jobs"}
ACCOUNTS = {"bash": "_cl_accounts", "zsh": "_cl_accounts"}


def cmd_hosts(config: Config, args: argparse.Namespace) -> int:
    """The fleet as this host's balancer reads it from the store; exit 1 if two hosts hold one credential."""
    reply = _fleet(config)
    if args.json:
        print_json(reply)
    else:
        print_hosts(reply, ([f"{a['name']} ({a['state']})" for a in host["accounts"]] for host in reply["hosts"]))
    for duplicate in reply["duplicates"]:
        held = ", ".join(f"{d['account']} on {d['host']}" for d in duplicate["held_by"])
        print(
            f"WARNING: one credential is on several hosts ({held}): {duplicate['served_by']} is to serve it;"
            " remove the other copies",
            file=sys.stderr,
        )
    for clash in reply["clashes"]:
        print(
            f"WARNING: account name {clash['account']} is used on {' and '.join(clash['hosts'])} for different"
            " credentials: they share walls, usage and settings; rename one file",
            file=sys.stderr,
        )
    return EXIT_DIFFER if reply["duplicates"] or reply["clashes"] else 0


def _fleet(config: Config) -> dict[str, Any]:
    """The balancer's `hosts` reply: the fleet as the store has it (`cl.fleet`)."""
    reply = ask(config, "balancer", {"request": "hosts"})
    reply.pop("ok", None)
    return reply


def _live_hosts(fleet: dict[str, Any]) -> int:
    """How many hosts of the fleet are live (one host renamed leaves the earlier name gone)."""
    return sum(1 for host in fleet["hosts"] if host["live"])


def print_hosts(fleet: dict[str, Any], last: Iterable[list[str]], heading: str = "ACCOUNTS") -> None:
    """A row per host: its heartbeat's age, live or gone, how many accounts, and `last` (its column)."""
    late = f"gone: {fleet['missed']} heartbeats late"
    rows = [
        [
            host["name"] + (" (this host)" if host["name"] == fleet["host"] else ""),
            f"{host['heartbeat_age']:.1f} s ago",
            "live" if host["live"] else late,
            str(len(host["accounts"])),
            ", ".join(words) or "-",
        ]
        for host, words in zip(fleet["hosts"], last, strict=True)
    ]
    print_table(["HOST", "HEARTBEAT", "STATE", "N", heading], rows)


def _settings(settings: dict[str, Any] | None) -> str:
    """An account's settings in a few words: `paused · max 2 · models opus,sonnet`, or `-`."""
    if not settings:
        return "-"
    words = ["paused"] if settings["paused_since"] else []
    if settings["max_sessions"] is not None:
        words.append(f"max {settings['max_sessions']}")
    if settings["models"] is not None:
        words.append(f"models {','.join(settings['models'])}")
    if settings.get("allow_overage"):
        words.append("overage allowed")
    if settings.get("pause_at") is not None:
        words.append(f"pause at {settings['pause_at']:.0%}")
    return " · ".join(words) or "-"


def cmd_pause(config: Config, args: argparse.Namespace) -> int:
    force = {"force": True} if args.force else {}
    return _set_account(config, args.name, {"paused": args.action == "pause", **force})


SETTINGS = ("max_sessions", "models", "allow_overage", "pause_at")
"""What `cl accounts set` sets (pausing has its own commands)."""


def cmd_set(config: Config, args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {}
    for assignment in args.settings:
        key, _, value = assignment.partition("=")
        if key not in SETTINGS or "=" not in assignment:
            raise CommandError(f"{assignment!r}: expected KEY=VALUE with KEY one of {', '.join(SETTINGS)}", EXIT_USAGE)
        if key == "max_sessions":
            if value and not (value.isdigit() and int(value) >= 1):
                raise CommandError(f"max_sessions={value}: a whole number from 1, or empty for the default", EXIT_USAGE)
            changes[key] = int(value) if value else None
        elif key == "allow_overage":
            if value not in ("yes", "no", ""):
                raise CommandError(f"allow_overage={value}: yes or no (empty: no, the default)", EXIT_USAGE)
            changes[key] = value == "yes"
        elif key == "pause_at":
            changes[key] = _pause_at(value) if value else None
        else:
            changes[key] = [model.strip() for model in value.split(",") if model.strip()] or None
    return _set_account(config, args.name, changes)


def _pause_at(value: str) -> float:
    """`pause_at=0.9` or `pause_at=90%`: a fraction above 0 and at most 1."""
    try:
        fraction = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise CommandError(f"pause_at={value}: a utilization like 0.9 or 90% (empty: never)", EXIT_USAGE)
    return fraction


def _set_account(config: Config, name: str, changes: dict[str, Any]) -> int:
    settings = ask(config, "balancer", {"request": "account", "account": name, **changes})["settings"]
    print(f"{name}: {_settings(settings)}")
    if not settings["present"]:
        print(f"cl: there is no account {name} now: the setting waits for its credential file", file=sys.stderr)
    return 0


def cmd_submit(config: Config, args: argparse.Namespace) -> int:
    cwd = os.path.realpath(args.cwd)
    if not os.path.isdir(cwd):
        why = "not a directory" if os.path.exists(cwd) else "no such directory"
        raise CommandError(f"--cwd {args.cwd}: {why}", EXIT_USAGE)
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"--prompt-file {args.prompt_file}: cannot read: {exc}", EXIT_USAGE) from None
    else:
        prompt = args.prompt or ""
    if not prompt.strip():
        raise CommandError("the prompt is empty", EXIT_USAGE)
    _fits("the prompt", prompt)
    request = {"request": "submit", "cwd": cwd, "prompt": prompt, "model": args.model, "max_turns": args.max_turns}
    job = ask(config, "balancer", request)["job"]
    print(json.dumps({"job": job}) if args.json else job)
    return 0


def _fits(what: str, text: str) -> None:
    """A prompt over `MAX_PROMPT_BYTES` is refused here, before anything is sent, in bytes."""
    size = len(text.encode())
    if size > MAX_PROMPT_BYTES:
        raise CommandError(
            f"{what} is {size:,} bytes; a job takes at most {MAX_PROMPT_BYTES:,} bytes (48 KiB): put the rest in a"
            " file in the job's directory and have the prompt point the CLI at it",
            EXIT_USAGE,
        )


SENT = {
    "next-turn": "its CLI takes it when the turn it is in ends",
    "with-move": "it goes with the session's move to an account with room",
    "queued": "the session resumes with it on the account with the most room",
}


def cmd_send(config: Config, args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise CommandError("the text is empty", EXIT_USAGE)
    _fits("the text", text)
    reply = ask(config, "balancer", {"request": "send", "job": args.job, "text": text})
    print(f"job {reply['job']}: sent; {SENT.get(reply['sent'], reply['sent'])}")
    return 0


def cmd_cancel(config: Config, args: argparse.Namespace) -> int:
    reply = ask(config, "balancer", {"request": "cancel", "job": args.job})
    print(f"job {reply['job']} cancelled")
    return 0


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    if args.watch is None:
        return _status(config, args)
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() and not args.json else ""
    while True:  # until Ctrl-C (130)
        screen = io.StringIO()
        with contextlib.redirect_stdout(screen):
            _status(config, args)
        sys.stdout.write(clear + screen.getvalue() + ("" if clear or args.json else "\n"))
        sys.stdout.flush()
        time.sleep(args.watch)


def _interval(text: str) -> float:
    seconds = float(text)
    if not 0.1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError("must be 0.1 to 3600 seconds")
    return seconds


def _status(config: Config, args: argparse.Namespace) -> int:
    status = ask(config, "balancer", {"request": "status"})
    status.pop("ok", None)
    try:
        waiting = ask(config, "rescue", {"request": "waiting"})
        waiting.pop("ok", None)
    except CommandError as exc:  # the balancer's view still helps; say what is missing
        print(f"cl: {exc}: walled sessions are not being rescued", file=sys.stderr)
        waiting = None
    status["waiting"] = waiting
    status["fleet"] = fleet = _fleet(config)
    if args.json:
        print_json(status)
        return 0
    now = time.time()
    print_table(
        ["ACCOUNT", "STATE", "SESSIONS", "5H", "7D", "TOKENS IN/OUT"],
        [
            [
                a["name"],
                _account_state(a, now),
                str(a["sessions"]),
                _window(a, "five_hour", now),
                _window(a, "seven_day", now),
                _tokens(a.get("usage", {})),
            ]
            for a in status["accounts"]
        ],
    )
    print()
    print_sessions(status["sessions"], args.output == "wide")
    if status["blocked"]:
        print(f"\n{status['queue']} job(s) queued: work waits, no CLI can start: {status['blocked']}")
    else:
        print(f"\n{status['queue']} job(s) queued{_queue_reasons(status, now) if status['queue'] else ''}")
    if _live_hosts(fleet) > 1:  # a fleet: where the sessions run
        print()
        by_host = collections.Counter(session.get("host") or fleet["host"] for session in status["sessions"])
        print_hosts(fleet, ([f"{by_host[host['name']]} session(s)"] for host in fleet["hosts"]), "SESSIONS")
    if waiting and waiting["sessions"]:
        why = f"work waits, no CLI can start: {waiting['blocked']}" if waiting["blocked"] else _waits_for(waiting)
        print(f"\n{len(waiting['sessions'])} session(s) waiting for an account: {why}")
        print_table(
            ["SESSION", "JOB", "WALLED ON", "STATE", "SINCE"],
            [
                [
                    _short(w["session_id"], args.output == "wide"),
                    str(w["job"]),
                    w["account"] or "-",
                    w["state"],
                    w["since"],
                ]
                for w in waiting["sessions"]
            ],
        )
    return 0


WINDOWS = {"five_hour": "5h", "seven_day": "7d"}


def _account_state(account: dict[str, Any], now: float) -> str:
    """Its one state in words: `ok`, `paused`, `walled (5h) until T`, ...; each model's window
    walled after it (`ok, opus walled until T`)."""
    state = str(account["state"])
    if state == "walled":
        window = f" ({WINDOWS.get(account['window'], account['window'])})" if account["window"] else ""
        state += f"{window} until {_when(account['walled_until'], now) if account['walled_until'] else 'lifted'}"
    for model, until in sorted((account.get("model_walls") or {}).items()):
        state += f", {model} walled until {_when(until, now) if until else 'lifted'}"
    return state


def _queue_waits_for(accounts: list[dict[str, Any]], now: float, ramping: Collection[str] = ()) -> str:
    """Why queued jobs wait, as the accounts show it, each state counted: `2 paused (...), 1
    walled until T, 1 needs-login`; the accounts the ramp after a wall holds back (`ramping`) by
    name."""
    by_state = collections.Counter(a["state"] for a in accounts)
    if not accounts:
        return ": waiting for an account (there is none: drop a credential file in)"
    reasons = []
    order = ("ok", "walled", "paused", "probation", "needs-login", "invalid")
    for state, count in sorted(by_state.items(), key=lambda item: order.index(item[0])):
        if state == "ok":
            if held := [a["name"] for a in accounts if a["state"] == "ok" and a["name"] in ramping]:
                reasons.append(f"{', '.join(held)} held by the ramp after a wall")
            if count > len(held):
                limited = count - len(held)
                reasons.append(f"{limited} ok but at its session limit or not serving the job's model (cl accounts)")
        elif state == "paused":
            reasons.append(f"{count} paused (cl accounts resume NAME)")
        elif state == "walled":
            resets = [a["walled_until"] for a in accounts if a["state"] == "walled" and a["walled_until"]]
            reasons.append(f"{count} walled" + (f", the first until {_when(min(resets), now)}" if resets else ""))
        else:
            reasons.append(f"{count} {state}")
    return ": " + ", ".join(reasons)


def _queue_reasons(status: dict[str, Any], now: float) -> str:
    ramping = set(status.get("ramping", ()))
    return _queue_waits_for(status["accounts"], now, ramping) + _models_wait_for(status["accounts"], status["jobs"])


def _models_wait_for(accounts: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> str:
    """For each model queued jobs ask for that no account may take now: `; 2 for opus: no account
    serves opus` (its settings), or `opus's window walled on every account that serves it`."""
    from cl.store.records import AccountSettings, family  # noqa: PLC0415 - `cl status` alone needs these

    said = []
    wanted = collections.Counter(job["model"] for job in jobs if job["state"] == "queued" and job.get("model"))
    for model, count in sorted(wanted.items()):
        open_to = [a for a in accounts if a["state"] in ("ok", "probation")]
        serving = [a for a in open_to if AccountSettings(a["name"], models=_models(a)).serves(model)]
        if not serving:
            said.append(f"{count} for {model}: no account serves {model} (cl accounts set NAME models=...)")
        elif all(family(model) in (a.get("model_walls") or {}) for a in serving):
            said.append(f"{count} for {model}: its window is walled on every account that serves it")
    return "".join(f"; {line}" for line in said)


def _models(account: dict[str, Any]) -> tuple[str, ...] | None:
    """The models an account as `status` shows it may serve (None: any)."""
    models = (account.get("settings") or {}).get("models")
    return None if models is None else tuple(models)


def _when(iso: str, now: float) -> str:
    """A moment, absolute and relative in one style: `2026-12-01 18:00Z (in 1h20m)`."""
    seconds = int(_epoch(iso) - now)
    stretch = span(abs(seconds))
    return f"{iso[:10]} {iso[11:16]}Z ({'in ' + stretch if seconds >= 0 else stretch + ' ago'})"


def _waits_for(waiting: dict[str, Any]) -> str:
    """What would end the wait, in words."""
    chances = ["a new credential file"]
    if waiting["next_reset"]:
        chances.append(f"the next wall reset at {waiting['next_reset']}")
    if waiting["probing"]:
        chances.append(f"the first answer from {', '.join(waiting['probing'])} after its reset")
    if waiting.get("ramping"):
        chances.append(f"a session ending on {', '.join(waiting['ramping'])} (the ramp after a wall)")
    return " or ".join(chances)


def _listing(config: Config, args: argparse.Namespace, what: str) -> tuple[list[dict[str, Any]], int]:
    """`sessions` or `jobs`, live ones unless `--all` or `--state` asks further back, since
    `--since`; and how many finished jobs the listing left out."""
    finished = args.all or args.state is not None
    reply = ask(config, "balancer", {"request": "status", "finished": finished})
    rows: list[dict[str, Any]] = reply[what]
    if args.state is not None:
        rows = [row for row in rows if row["state"] == args.state]
    if args.since is not None:
        stamp = "started_at" if what == "sessions" else "created_at"
        rows = [row for row in rows if _epoch(row[stamp]) >= args.since]
    return rows, int(reply.get("hidden", 0))


def _since(text: str) -> float:
    """`--since`: a span back from now (`90m`, `2h`, `3d`) or a moment (`2026-12-01T08:00:00Z`)."""
    spans = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[:-1].isdigit() and text[-1:] in spans:
        return time.time() - int(text[:-1]) * spans[text[-1]]
    try:
        return _epoch(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "a span back from now (90m, 2h, 3d) or a UTC moment (2026-12-01T08:00:00Z)"
        ) from None


def cmd_sessions(config: Config, args: argparse.Namespace) -> int:
    sessions, _ = _listing(config, args, "sessions")
    if args.json:
        print_json(sessions)
    else:
        print_sessions(sessions, args.output == "wide")
    return 0


def cmd_jobs(config: Config, args: argparse.Namespace) -> int:
    jobs, hidden = _listing(config, args, "jobs")
    wide = args.output == "wide"
    if args.json:
        print_json(jobs)
    else:
        print_table(
            ["JOB", "STATE", "ACCOUNT", "SESSION", "CWD", "ERROR"],
            [
                [
                    str(j["id"]),
                    j["state"],
                    j["account"] or "-",
                    _short(j["session_id"], wide),
                    j["cwd"],
                    j["error"] or "",
                ]
                for j in jobs
            ],
        )
        if hidden:
            print(f"\n{hidden} finished job(s) not shown: cl jobs --all (or --state done, failed, cancelled)")
    return 0


def _short(session_id: str | None, wide: bool) -> str:
    """A session id as a table shows it: its first 8 characters (any 4 or more find it), whole
    with `-o wide`."""
    if session_id is None:
        return "-"
    return session_id if wide else session_id[:SHORT_ID]


def cmd_job(config: Config, args: argparse.Namespace) -> int:
    story = ask(config, "balancer", {"request": "job", "job": args.job})
    story.pop("ok", None)
    if args.json:
        print_json(story)
        return 0
    job = story["job"]
    print(f"job {job['id']}: {job['state']}{' (' + shown(job['error']) + ')' if job['error'] else ''}")
    print(f"  submitted {job['created_at']} in {job['cwd']}, session {job['session_id'] or '-'}")
    print(f"  prompt: {_one_line(job['prompt'])}")
    print()
    print_table(
        ["RUN", "ACCOUNT", "STATE", "STARTED", "ENDED", "CACHE READ/WRITTEN", "ERROR"],
        [
            [
                str(r["id"]),
                r["account"],
                r["state"],
                r["started_at"],
                r["ended_at"] or "-",
                f"{r.get('cache_read_tokens', 0)}/{r.get('cache_creation_tokens', 0)}",
                r["error"] or "",
            ]
            for r in story["runs"]
        ],
    )
    for run in story["runs"]:
        if run.get("follow_up"):
            print(f"  run {run['id']} took a follow-up (cl send): {_one_line(run['follow_up'])}")
    for move in story["moves"]:
        print(f"  moved {move['from']} -> {move['to']} at {move['at']} ({move['why']}; {move['how']})")
    if (result := story["result"]) is not None:
        usage = result.get("usage") or {}
        print(f"\nresult: {_one_line(str(result.get('result', '')))}")
        if usage:
            print(f"  tokens in/out: {usage.get('input_tokens', 0)}/{usage.get('output_tokens', 0)}")
    return 0


def cmd_result(config: Config, args: argparse.Namespace) -> int:
    """The job's last answer; a job that failed or was cancelled without one says so, and exits
    as `cl wait` does (5, 6)."""
    story = ask(config, "balancer", {"request": "job", "job": args.job})
    result, job = story["result"], story["job"]
    if result is None:
        if job["state"] in ("failed", "cancelled"):
            why = f": {shown(job['error'])}" if job["error"] else ""
            raise CommandError(f"job {args.job} {job['state']}{why}", FINISHED[job["state"]])
        raise CommandError(f"job {args.job} has no result yet ({job['state']})", EXIT_NOT_FOUND)
    if args.json:
        print_json(result)
    else:
        print(shown(str(result.get("result", ""))))
    return 0


FINISHED = {"done": 0, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
"""`cl wait`'s exit code for each way a job ends."""


def cmd_wait(config: Config, args: argparse.Namespace) -> int:
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while (state := ask(config, "balancer", {"request": "job", "job": args.job})["job"]["state"]) not in FINISHED:
        if deadline is not None and time.monotonic() >= deadline:
            raise CommandError(f"job {args.job} is still {state} after {args.timeout:g} s", EXIT_TIMED_OUT)
        time.sleep(args.interval)
    return FINISHED[state]


def _one_line(text: str, width: int = 100) -> str:
    line = " ".join(shown(text).split())
    return line if len(line) <= width else line[: width - 1] + "…"


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def shown(text: str) -> str:
    """Text from a job (the CLI's words, a prompt) as it may reach a terminal: every control
    character but a line break and a tab written out (`\\x1b`), so no escape sequence acts."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def cmd_logs(config: Config, args: argparse.Namespace) -> int:
    offset, partial = 0, ""
    while True:
        reply = ask(config, "balancer", {"request": "logs", "session": args.session, "offset": offset})
        if args.json and not args.follow:
            print(json.dumps({"output": reply["data"], "finished": reply["finished"]}))
            return 0
        if args.raw:
            sys.stdout.write(shown(reply["data"]) if sys.stdout.isatty() else reply["data"])
        else:  # whole lines only: the rest waits for the next read
            *lines, partial = (partial + reply["data"]).split("\n")
            for line in lines:
                if (text := readable(line)) is not None:
                    print(shown(text))
        sys.stdout.flush()
        offset = reply["offset"]
        if not args.follow or (reply["finished"] and not reply["data"]):
            return 0
        if not reply["data"]:
            time.sleep(0.2)


def readable(line: str) -> str | None:
    """One line of the CLI's stream-json as a person reads it; None for what says nothing to one."""
    try:
        event = json.loads(line)
    except ValueError:
        return line or None  # the CLI's own words (stderr), as they are
    if not isinstance(event, dict):
        return line
    kind = event.get("type")
    if kind == "system" and event.get("subtype") == "init":
        version = event.get("claude_code_version")
        return f"── session {event.get('session_id')} ({event.get('model')}, Claude Code {version})"
    if kind == "assistant":
        return "\n".join(filter(None, map(_block, (event.get("message") or {}).get("content") or []))) or None
    if kind == "rate_limit_event" and (event.get("rate_limit_info") or {}).get("status") == "rejected":
        resets = (event.get("rate_limit_info") or {}).get("resetsAt")
        return f"⚠ usage wall{' until ' + time.strftime('%Y-%m-%d %H:%MZ', time.gmtime(resets)) if resets else ''}"
    if kind == "cl_move":  # cl's own line between two runs of a job
        how = f"; {event['how']}" if event.get("how") else ""
        return f"── moved {event.get('from')} → {event.get('to')} ({event.get('why')}{how}) at {event.get('at')}"
    if kind == "result":
        usage = event.get("usage") or {}
        tokens = f", tokens {usage.get('input_tokens', 0)}/{usage.get('output_tokens', 0)}" if usage else ""
        errors = "; ".join(map(str, event.get("errors") or []))
        return f"── {'error' if event.get('is_error') else 'done'}{tokens}{': ' + errors if errors else ''}"
    return None


def _block(block: Any) -> str | None:
    if not isinstance(block, dict):
        return None
    if block.get("type") == "text":
        return str(block.get("text", ""))
    if block.get("type") == "tool_use":
        return f"→ {block.get('name')} {_one_line(json.dumps(block.get('input'), ensure_ascii=False), 80)}"
    return None


def print_sessions(sessions: list[dict[str, Any]], wide: bool) -> None:
    now = time.time()
    print_table(
        ["SESSION", "JOB", "ACCOUNT", "STATE", "AGE", "CWD"],
        [
            [
                _short(s["session_id"], wide),
                str(s["job"]),
                s["account"] or "-",
                s["state"],
                _age(s["started_at"], now),
                s["cwd"],
            ]
            for s in sessions
        ],
    )


def _tokens(usage: dict[str, Any]) -> str:
    return f"{usage['input_tokens']}/{usage['output_tokens']}" if "input_tokens" in usage else "-"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _window(account: dict[str, Any], name: str, now: float, *, read: bool = False) -> str:
    """A window's utilization, and as the API's headers said them, its reset and burn rate:
    `42% (resets in 2h10m, +5%/h)`; with `read`, how long ago the API said so (`read 3m05s ago`).
    One whose reset has passed is empty until the API says otherwise: `0% (reset 4m10s ago, was
    100%)`; a 5-hour one that is the first since a wall says so (`after a wall`)."""
    windows = {period: _as_window(said) for period, said in (account.get("windows") or {}).items()}
    window = windows.get(name)
    if window is None:
        return _percent(account.get("usage", {}).get(name))
    words = [_percent(window.utilization)]
    if window.reset_at is not None:
        if window.standing(now):
            words.append(f"resets in {span(window.reset_at - now)}")
        else:
            words = ["0%", f"reset {span(now - window.reset_at)} ago, was {words[0]}"]
    if window.per_hour is not None:
        words.append(f"+{window.per_hour * 100:.0f}%/h")
    if read and window.read_at is not None:
        words.append(f"read {span(max(0, now - window.read_at))} ago")
    if name == "five_hour" and first_since_wall(windows, now):
        words.append("after a wall")
    used, *more = words
    return f"{used} ({', '.join(more)})" if more else used


def _as_window(said: dict[str, Any]) -> Window:
    """A window as `status` says it (`Window.public`)."""
    moment = {key: _epoch(said[key]) if said.get(key) else None for key in ("resets", "read")}
    return Window(
        said["utilization"], moment["resets"], said["per_hour"], moment["read"], said["after_wall"], said["per_session"]
    )


def _epoch(iso: str) -> int:
    """An ISO 8601 UTC moment as cl writes them (`2026-12-01T08:00:00Z`): its epoch second."""
    return calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))


def _age(iso: str, now: float) -> str:
    return span(now - _epoch(iso))


def describe_differences(views: dict[str, list[dict[str, Any]]]) -> list[str]:
    balancer, rescue = ({a["name"]: a for a in views[daemon]} for daemon in DAEMONS)
    lines = [f"{name}: only cl-balancer sees it" for name in sorted(balancer.keys() - rescue.keys())]
    lines += [f"{name}: only cl-rescue sees it" for name in sorted(rescue.keys() - balancer.keys())]
    lines += [
        f"{name}: cl-balancer says {balancer[name]['file']}, cl-rescue says {rescue[name]['file']}"
        for name in sorted(balancer.keys() & rescue.keys())
        if balancer[name] != rescue[name]
    ]
    return lines


def print_json(value: Any) -> None:
    """Indented for a person at a terminal; one compact line for a pipe (Python indents
    without its C encoder: 10,000 accounts would take a tenth of a second more)."""
    print(json.dumps(value, indent=2 if sys.stdout.isatty() else None))


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Columns as wide as their widest cell, two spaces apart; written at once (10,000 rows)."""
    rows = [[" ".join(shown(str(cell)).split("\n")) for cell in row] for row in rows]
    widths = [max(map(len, column)) for column in zip(header, *rows, strict=True)]
    template = "  ".join(f"{{:<{width}}}" for width in widths)
    sys.stdout.write("".join(template.format(*row).rstrip() + "\n" for row in [header, *rows]))


def _version() -> str:
    try:
        return importlib.metadata.version("cl-roster")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


SHORT_ID = 8
"""A session id's characters a table shows (`-o wide`: all); any 4 or more find it."""
JSON_HELP = "machine-readable output: one JSON value (indented on a terminal, one line in a pipe)"
JOB_HELP = "the job's id, as `cl submit` printed it"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cl",
        description="Claude Code sessions across accounts: submit work, see accounts, sessions and walls.",
        epilog="Exit codes: 0 fine, 1 the daemons disagree, 2 usage or a refused request, 3 a daemon or its store "
        "unreachable, 4 no such job, session or account, or no result yet; `cl wait` and `cl result`: 5 failed, "
        "6 cancelled; `cl wait --timeout`: 7 not ended; `cl doctor`: 8 something stops work. `cl COMMAND --help` "
        "for each; `man cl` for all.",
    )
    p.add_argument("--version", action="version", version=f"cl {_version()}")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, examples: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=text,
            description=text,
            epilog="examples:\n" + examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    accounts = command(
        "accounts",
        "every account with its one state, kind, token expiry, windows and settings",
        "  cl accounts                    every account (exit 1 if the two daemons see different ones)\n"
        "  cl accounts --from rescue      the roster as one daemon reads it: each file's state\n"
        "  cl accounts pause a2           a2 takes no new work (resume: cl accounts resume a2)\n"
        "  cl accounts set a1 max_sessions=2 models=opus\n",
    )
    accounts.add_argument("--from", dest="source", choices=DAEMONS, help="ask just this daemon")
    accounts.add_argument("--json", action="store_true", help=JSON_HELP)
    accounts.set_defaults(func=cmd_accounts)
    _account_actions(accounts)

    completing = command(
        "complete",
        "job ids or account names, one a line: what shell completion offers (from the daemons)",
        "  cl complete jobs\n  cl complete accounts\n",
    )
    completing.add_argument("what", choices=("jobs", "accounts"), help="job ids (yours) or account names")
    completing.set_defaults(func=cmd_complete)

    checkup = command(
        "doctor",
        "check what work needs: the CLI, its users, its view, cl's directories, the daemons, the store, the "
        "credential files; each problem with its fix (exit 8 if one stops work)",
        "  cl doctor\n  cl doctor --json\n",
    )
    checkup.add_argument("--json", action="store_true", help=JSON_HELP)
    checkup.set_defaults(func=cmd_doctor)

    submit = command(
        "submit",
        "queue a job; prints its id",
        "  cl submit --cwd /srv/repo --prompt 'fix the flaky test'\n"
        "  cl submit --cwd . --prompt-file task.md --model opus --max-turns 30 --json\n",
    )
    submit.add_argument(
        "--cwd",
        default=".",
        help="the job's working directory: one you and the CLI's user (cl-cli) can write (default: this one)",
    )
    source = submit.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help=f"the prompt (at most {MAX_PROMPT_BYTES:,} bytes, UTF-8)")
    source.add_argument("--prompt-file", help="read the prompt from this file (the same limit)")
    submit.add_argument("--model", help="the model to ask for (passed to the CLI as --model)")
    submit.add_argument("--max-turns", type=int, help="stop the session after this many turns")
    submit.add_argument("--json", action="store_true", help=JSON_HELP)
    submit.set_defaults(func=cmd_submit)

    send = command(
        "send",
        "continue a job's session with a new prompt: in place if its CLI is alive, else resumed where there is room",
        "  cl send 7 'now add a test for it'\n  cl send 7 - < next-step.md\n  cl send 7 'and the docs' && cl wait 7\n",
    )
    send.add_argument("job", type=int, help=JOB_HELP).complete = JOBS  # type: ignore[attr-defined]
    send.add_argument(
        "text", help=f"the prompt (at most {MAX_PROMPT_BYTES:,} bytes, UTF-8), or - to read it from standard input"
    )
    send.set_defaults(func=cmd_send)

    cancel = command(
        "cancel",
        "cancel a live job: queued, waiting or running (its CLI and all it started are stopped)",
        "  cl cancel 7\n",
    )
    cancel.add_argument("job", type=int, help=JOB_HELP).complete = JOBS  # type: ignore[attr-defined]
    cancel.set_defaults(func=cmd_cancel)

    for name, func, text, example in (
        (
            "status",
            cmd_status,
            "accounts, live sessions and jobs, and the queue",
            "  cl status\n  cl status --watch      again every 2 s until Ctrl-C\n  cl status --json\n",
        ),
        (
            "sessions",
            cmd_sessions,
            "sessions with job, account, state, age",
            "  cl sessions\n  cl sessions --state walled\n",
        ),
        ("jobs", cmd_jobs, "jobs and where they stand", "  cl jobs\n  cl jobs --all --since 2h\n"),
        (
            "hosts",
            cmd_hosts,
            "the fleet: each host's heartbeat and accounts; exit 1 if two hosts hold the same credential",
            "  cl hosts\n  cl hosts --json\n",
        ),
    ):
        listing = command(name, text, example)
        listing.add_argument("--json", action="store_true", help=JSON_HELP)
        if name != "hosts":
            listing.add_argument(
                "-o",
                "--output",
                choices=("wide",),
                help="wide: session ids whole (tables show their first 8 characters)",
            )
        if name == "status":
            listing.add_argument(
                "-w",
                "--watch",
                nargs="?",
                const=2.0,
                type=_interval,
                metavar="SECONDS",
                help="show it again every SECONDS (2) until Ctrl-C; with --json, one line each time",
            )
        if name in ("sessions", "jobs"):
            listing.add_argument("--all", action="store_true", help="finished ones too (kept retention_days)")
            listing.add_argument("--state", choices=STATES, help="only those in this state")
            listing.add_argument("--since", type=_since, help="only those since: 90m, 2h, 3d, or a UTC moment")
        listing.set_defaults(func=func)

    _job_commands(command)

    logs = command(
        "logs",
        "a session's output, as text (by job id, session id, or the start of a session id)",
        "  cl logs 7 -f\n  cl logs 59f9c2ad --raw\n",
    )
    which = logs.add_argument("session", help="a job id, a session id, or its first 4 characters or more")
    which.complete = JOBS  # type: ignore[attr-defined]
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the session ends")
    logs.add_argument("--raw", action="store_true", help="the CLI's stream-json, as it wrote it")
    logs.add_argument("--json", action="store_true", help='{"output", "finished"} (the output is stream-json lines)')
    logs.set_defaults(func=cmd_logs)
    return p


def _job_commands(command: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    """`cl job`, `cl result` and `cl wait`: one job, by its id."""
    job = command("job", "one job's story: prompt, state, runs, moves, result", "  cl job 7\n  cl job 7 --json\n")
    job.add_argument("job", type=int, help=JOB_HELP).complete = JOBS  # type: ignore[attr-defined]
    job.add_argument("--json", action="store_true", help=JSON_HELP)
    job.set_defaults(func=cmd_job)

    result = command(
        "result", "a job's final answer", "  cl result 7\n  cl result 7 --json   the result event: usage, cost\n"
    )
    result.add_argument("job", type=int, help=JOB_HELP).complete = JOBS  # type: ignore[attr-defined]
    result.add_argument("--json", action="store_true", help="the whole result event, as JSON")
    result.set_defaults(func=cmd_result)

    wait = command(
        "wait",
        "wait until a job ends; exit 0 done, 5 failed, 6 cancelled, 4 no such job, 7 --timeout passed (for scripts)",
        "  cl wait 7 && cl result 7\n  cl wait 7 --timeout 600 || echo 'not done in 10 minutes'\n",
    )
    wait.add_argument("job", type=int, help=JOB_HELP).complete = JOBS  # type: ignore[attr-defined]
    wait.add_argument("--interval", type=float, default=0.5, help="seconds between looks (default 0.5)")
    wait.add_argument("--timeout", type=float, help="give up after this many seconds: exit 7 (default: never)")
    wait.set_defaults(func=cmd_wait)


def _account_actions(accounts: argparse.ArgumentParser) -> None:
    """`cl accounts pause|resume|set`."""
    actions = accounts.add_subparsers(
        dest="action", metavar="ACTION", help="pause, resume or set an account (without one: list the accounts)"
    )
    name_help = "the account's name (its file is credentials-NAME.json)"
    for action, text in (
        ("pause", "take no new or moved work on this account; its live sessions finish (kept across restarts)"),
        ("resume", "let a paused account take work again"),
    ):
        pausing = actions.add_parser(
            action,
            help=text,
            description=f"{text}. Root and group cl-admin only.",
            epilog=f"example:\n  cl accounts {action} a2\n",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        pausing.add_argument("name", help=name_help).complete = ACCOUNTS  # type: ignore[attr-defined]
        if action == "pause":
            pausing.add_argument(
                "--force", action="store_true", help="pause a name with no credential file (yet): it waits for one"
            )
        pausing.set_defaults(func=cmd_pause, force=False)
    setting = actions.add_parser(
        "set",
        help="set an account's own max_sessions, models, allow_overage or pause_at (empty value: the default)",
        description="Set an account's own settings: max_sessions (its session limit, instead of "
        "max_sessions_per_account), models (shell patterns of the models it may serve; all unless set) and "
        "allow_overage (yes: it may spend paid overage past its windows; no, the default: the first answer "
        "billed as overage walls it until its window resets) and pause_at (a utilization, 0.9 or 90%: it takes "
        "no new or moved work while one of its windows is that full). "
        "Settings are kept by name: one for an account without a file waits for it. Root and group cl-admin only.",
        epilog="examples:\n  cl accounts set a1 max_sessions=2\n  cl accounts set a1 models=opus,claude-sonnet-*\n"
        "  cl accounts set a1 allow_overage=yes\n  cl accounts set a1 pause_at=90%\n"
        "  cl accounts set a1 models= max_sessions=     back to the defaults\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    setting.add_argument("name", help=name_help).complete = ACCOUNTS  # type: ignore[attr-defined]
    setting.add_argument(
        "settings",
        nargs="+",
        metavar="KEY=VALUE",
        help="max_sessions=N, models=A,B, allow_overage=yes|no or pause_at=0.9",
    )
    setting.set_defaults(func=cmd_set)


STATES = sorted({*JobState, *RunState})
"""What `--state` may name: a job's states and a session's (its run's)."""

CLIENT_KEYS = ("runtime_dir",)
"""All the command line needs of the configuration: where the sockets are."""
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> None:
    # `cl jobs | head -1`: when the reader goes, so do we, quietly, as any Unix tool does.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = parser().parse_args(argv)
    try:
        config = load_config(keys=CLIENT_KEYS)
        sys.exit(args.func(config, args))
    except ConfigError as exc:
        print(f"cl: configuration error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except CommandError as exc:
        print(f"cl: {exc}", file=sys.stderr)
        sys.exit(exc.code)
    except KeyboardInterrupt:  # Ctrl-C, in `cl logs -f` above all
        sys.exit(EXIT_INTERRUPTED)
