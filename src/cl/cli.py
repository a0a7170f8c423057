"""`cl`: the command line. It finds the daemons through the same configuration they use.

Exit codes: 0 fine, 1 the daemons disagree, 2 usage or configuration error, 3 a daemon
is unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from cl.config import Config, ConfigError, load_config
from cl.protocol import DaemonUnreachable, call

DAEMONS = ("balancer", "rescue")
EXIT_DIFFER, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


class CommandError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def ask(config: Config, daemon: str, request: dict[str, Any]) -> dict[str, Any]:
    try:
        reply = call(config.socket_path(daemon), request)
    except DaemonUnreachable as exc:
        raise CommandError(f"cl-{daemon} is unreachable ({exc}); is it running?", EXIT_UNREACHABLE) from None
    if not reply.get("ok"):
        raise CommandError(f"cl-{daemon} refused the request: {reply.get('error')}", EXIT_USAGE)
    return reply


def cmd_accounts(config: Config, args: argparse.Namespace) -> int:
    daemons = (args.source,) if args.source else DAEMONS
    views = {daemon: ask(config, daemon, {"request": "accounts"})["accounts"] for daemon in daemons}
    if args.json:
        print(json.dumps(views[args.source] if args.source else views, indent=2))
    elif args.source:
        print_table(
            ["ACCOUNT", "STATE", "KIND", "EXPIRES", "REASON"],
            [
                [a["name"], a["state"], a["kind"] or "-", a["expires_at"] or "-", a["reason"] or ""]
                for a in views[args.source]
            ],
        )
    else:
        by_daemon = {daemon: {a["name"]: a for a in view} for daemon, view in views.items()}
        names = sorted(set().union(*by_daemon.values()))
        rows = []
        for name in names:
            seen = [by_daemon[daemon].get(name) for daemon in DAEMONS]
            reason = next((a["reason"] for a in seen if a and a["reason"]), "")
            rows.append([name, *(a["state"] if a else "(absent)" for a in seen), reason])
        print_table(["ACCOUNT", *(d.upper() for d in DAEMONS), "REASON"], rows)
    if len(views) > 1 and (differences := describe_differences(views)):
        print("\nWARNING: cl-balancer and cl-rescue see different accounts:", file=sys.stderr)
        for line in differences:
            print(f"  {line}", file=sys.stderr)
        return EXIT_DIFFER
    return 0


def describe_differences(views: dict[str, list[dict[str, Any]]]) -> list[str]:
    balancer, rescue = ({a["name"]: a for a in views[daemon]} for daemon in DAEMONS)
    lines = [f"{name}: only cl-balancer sees it" for name in sorted(balancer.keys() - rescue.keys())]
    lines += [f"{name}: only cl-rescue sees it" for name in sorted(rescue.keys() - balancer.keys())]
    lines += [
        f"{name}: cl-balancer says {balancer[name]['state']}, cl-rescue says {rescue[name]['state']}"
        for name in sorted(balancer.keys() & rescue.keys())
        if balancer[name] != rescue[name]
    ]
    return lines


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cl", description="Claude Code sessions across accounts.")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    accounts = commands.add_parser("accounts", help="the accounts each daemon sees, with their states")
    accounts.add_argument("--from", dest="source", choices=DAEMONS, help="ask just this daemon")
    accounts.add_argument("--json", action="store_true", help="machine-readable output")
    accounts.set_defaults(func=cmd_accounts)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        config = load_config()
        sys.exit(args.func(config, args))
    except ConfigError as exc:
        print(f"cl: configuration error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except CommandError as exc:
        print(f"cl: {exc}", file=sys.stderr)
        sys.exit(exc.code)
