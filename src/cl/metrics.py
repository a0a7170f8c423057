"""`cl-metrics`: the daemons' state and counts in Prometheus's exposition format.

The daemons listen on Unix sockets only. This small process asks all three at every scrape
(their `metrics` requests) and serves the answer over HTTP on loopback: under systemd from
`cl-metrics.socket` (127.0.0.1:9847, socket-activated), otherwise on `--listen HOST:PORT`.
Asked at each scrape, a value is never older than the scrape, and a daemon that does not answer
shows as `cl_up{daemon=...} 0` rather than as stale numbers. `--textfile PATH` writes the same
text once, atomically, for node_exporter's textfile collector (from a timer) instead.
"""

from __future__ import annotations

import argparse
import os
import socket
import socketserver
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator, Sequence
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import MetricsHandler

from cl.account_state import State
from cl.client import DaemonUnreachable, call, exchange
from cl.config import Config, ConfigError, load_config

DAEMONS = ("balancer", "rescue", "gateway")
LISTEN_FDS_START = 3
DEFAULT_LISTEN = "127.0.0.1:9847"


class Collector:
    """Asks the daemons at each collection; what they say becomes metric families."""

    def __init__(self, config: Config) -> None:
        self._config = config

    def _ask(self, daemon: str) -> dict[str, Any] | None:
        try:
            reply = call(self._config.socket_path(daemon), {"request": "metrics"})
        except DaemonUnreachable:
            return None
        return reply if reply.get("ok") else None

    def collect(self) -> Iterator[Metric]:
        asked = DAEMONS if self._config.gateway else tuple(d for d in DAEMONS if d != "gateway")
        replies = {daemon: self._ask(daemon) for daemon in asked}
        up = GaugeMetricFamily("cl_up", "1 if the daemon answered this scrape", labels=["daemon"])
        for daemon, reply in replies.items():
            up.add_metric([daemon], 1.0 if reply is not None else 0.0)
        yield up
        if (balancer := replies["balancer"]) is not None:
            yield from _accounts(balancer["accounts"])
            yield from _queue(balancer["queue"])
        counters = {
            "placements": ("cl_placements_total", "jobs placed on an account"),
            "moves": ("cl_moves_total", "walled or orphaned sessions moved to another account"),
            "live_moves": ("cl_live_moves_total", "moves in which the session's CLI went on in the same process"),
            "failures": ("cl_failures_total", "runs that ended failed"),
            "requests_forwarded": ("cl_gateway_requests_total", "CLI requests the gateway forwarded to the API"),
            "requests_refused_capability": (
                "cl_gateway_refused_capability_total",
                "requests refused for an unknown or ended capability",
            ),
            "requests_refused_path": (
                "cl_gateway_refused_path_total",
                "requests refused for a path the CLI never uses",
            ),
            "walls_from_api": ("cl_gateway_walls_total", "429s whose headers walled an account"),
            "moves_in_flight": (
                "cl_gateway_moves_in_flight_total",
                "requests answered on another account after a wall",
            ),
            "early_moves": (
                "cl_gateway_early_moves_total",
                "sessions moved before their account walled (a window past move_at)",
            ),
            "walls_passed_to_cli": ("cl_gateway_walls_passed_total", "walls the CLI saw: no account had room"),
            "upstream_errors": ("cl_gateway_upstream_errors_total", "requests the API could not be reached for"),
            "token_refreshes": ("cl_token_refreshes_total", "OAuth tokens the gateway refreshed"),
            "token_refresh_failures": ("cl_token_refresh_failures_total", "refreshes that failed and will be retried"),
            "token_refreshes_refused": ("cl_token_refreshes_refused_total", "refresh tokens refused (invalid_grant)"),
        }
        for key, (name, text) in counters.items():
            counter = CounterMetricFamily(name, text, labels=["daemon"])
            for daemon, reply in replies.items():
                if reply is not None and key in reply.get("counters", {}):
                    counter.add_metric([daemon], reply["counters"][key])
            yield counter
        histograms = {
            "submit_to_started": ("cl_submit_to_started_seconds", "from a job's submission to its first answer"),
            "wall_to_resumed": ("cl_wall_to_resumed_seconds", "from a session's wall to its first answer elsewhere"),
        }
        for key, (name, text) in histograms.items():
            for reply in replies.values():
                if reply is not None and key in reply.get("histograms", {}):
                    histogram = reply["histograms"][key]
                    latency = HistogramMetricFamily(name, text)
                    latency.add_metric([], [(str(le), count) for le, count in histogram["buckets"]], histogram["sum"])
                    yield latency
        if (rescue := replies["rescue"]) is not None:
            yield GaugeMetricFamily(
                "cl_sessions_waiting", "walled or orphaned sessions no account can take now", value=rescue["waiting"]
            )


def _accounts(accounts: list[dict[str, Any]]) -> Iterator[Metric]:
    by_state = dict.fromkeys(map(str, State), 0)
    state = GaugeMetricFamily("cl_account_state", "1 for the account's state", labels=["account", "state"])
    utilization = GaugeMetricFamily(
        "cl_account_utilization_ratio", "usage of the window as last reported (0 to 1)", labels=["account", "window"]
    )
    resets = GaugeMetricFamily(
        "cl_account_window_reset_seconds",
        "when the window resets, as last reported (Unix time)",
        labels=["account", "window"],
    )
    burn = GaugeMetricFamily(
        "cl_account_window_burn_per_hour",
        "the window's utilization gained per hour, lately",
        labels=["account", "window"],
    )
    sessions = GaugeMetricFamily("cl_account_sessions", "live sessions on the account", labels=["account"])
    walled_until = GaugeMetricFamily(
        "cl_account_walled_until_seconds",
        "when the account's wall resets (Unix time); +Inf if unknown, 0 if not walled",
        labels=["account"],
    )
    for account in accounts:
        name = account["name"]
        by_state[account["state"]] += 1
        state.add_metric([name, account["state"]], 1.0)
        for window in ("five_hour", "seven_day"):
            if account[window] is not None:
                utilization.add_metric([name, window], account[window])
        for window, reading in (account.get("windows") or {}).items():
            if reading["reset_at"] is not None:
                resets.add_metric([name, window], reading["reset_at"])
            if reading["per_hour"] is not None:
                burn.add_metric([name, window], reading["per_hour"])
        sessions.add_metric([name], account["sessions"])
        until = 0.0 if not account["walled"] else account["walled_until"] or float("inf")
        walled_until.add_metric([name], until)
    totals = GaugeMetricFamily("cl_accounts", "accounts by state", labels=["state"])
    for name, count in by_state.items():
        totals.add_metric([name], count)
    yield from (totals, state, utilization, resets, burn, sessions, walled_until)


def _queue(queue: dict[str, Any]) -> Iterator[Metric]:
    yield GaugeMetricFamily("cl_queue_depth", "jobs waiting for an account", value=queue["depth"])
    yield GaugeMetricFamily(
        "cl_queue_oldest_age_seconds",
        "how long the oldest queued job has waited (0 if none)",
        value=queue["oldest_age"] or 0.0,
    )


def exposition(config: Config) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(config))
    return generate_latest(registry)


def write_textfile(config: Config, path: Path) -> None:
    """The exposition into `path`, replaced whole (node_exporter never reads half a file)."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(exposition(config))
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _listener(listen: str | None) -> socket.socket:
    """The socket systemd passed (socket activation), else one bound to `listen`."""
    if listen is None and os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1":
        return socket.socket(fileno=LISTEN_FDS_START)
    host, _, port = (listen or DEFAULT_LISTEN).rpartition(":")
    return socket.create_server((host, int(port)))


class _Server(ThreadingHTTPServer):
    """An HTTP server on a listening socket made elsewhere (by systemd): it makes no socket of its
    own, which the unit's RestrictAddressFamilies=AF_UNIX would refuse."""

    daemon_threads = True

    def __init__(self, listener: socket.socket, handler: type[MetricsHandler]) -> None:
        socketserver.BaseServer.__init__(self, listener.getsockname()[:2], handler)
        self.socket = listener


DASHBOARD = (Path(__file__).with_name("dashboard.html")).read_bytes()
"""The dashboard's page: one file, no build step, nothing fetched but `/dashboard.json`."""


def handler(config: Config, registry: CollectorRegistry) -> type[MetricsHandler]:
    """`/` the dashboard's page, `/dashboard.json` what it shows (the balancer's `dashboard`
    reply, passed on as it came), `/metrics` the metrics."""
    metrics = MetricsHandler.factory(registry)

    class Handler(metrics):  # type: ignore[valid-type,misc]
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path, _, query = self.path.partition("?")
            if path in ("/", "/dashboard"):
                self._send(200, "text/html; charset=utf-8", DASHBOARD)
            elif path == "/dashboard.json":
                wanted = urllib.parse.parse_qs(query).get("filter", [""])[0][:64]
                try:
                    reply = exchange(config.socket_path("balancer"), {"request": "dashboard", "filter": wanted})
                except DaemonUnreachable:
                    self._send(503, "application/json", b'{"ok":false,"error":"cl-balancer does not answer"}')
                    return
                self._send(200 if reply.startswith(b'{"ok":true') else 502, "application/json", reply)
            elif path == "/metrics":
                super().do_GET()
            else:  # (a browser's /favicon.ico would otherwise cost a scrape of every daemon)
                self._send(404, "text/plain", b"not found: / is the dashboard, /metrics the metrics\n")

        def _send(self, code: int, kind: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header(
                "Content-Security-Policy",
                "default-src 'none'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'",
            )
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            """Quiet: one line per request would flood the journal at one dashboard's pace."""

    return Handler


def serve(config: Config, listener: socket.socket) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(config))
    server = _Server(listener, handler(config, registry))
    server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cl-metrics",
        description="Serve cl's metrics for Prometheus (asking cl-balancer and cl-rescue at each scrape).",
        epilog="examples:\n  cl-metrics --listen 127.0.0.1:9847\n"
        "  cl-metrics --textfile /var/lib/prometheus/node-exporter/cl.prom   (once, from a timer)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--listen", metavar="HOST:PORT", help=f"serve HTTP here (default {DEFAULT_LISTEN}, or systemd's socket)"
    )
    where.add_argument("--textfile", type=Path, metavar="PATH", help="write the metrics to PATH once and exit")
    args = parser.parse_args(argv)
    try:
        config = load_config(keys=("runtime_dir", "gateway"))
    except ConfigError as exc:
        print(f"cl-metrics: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.textfile is not None:
        write_textfile(config, args.textfile)
        return
    try:
        listener = _listener(args.listen)
    except (OSError, ValueError) as exc:
        print(f"cl-metrics: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        serve(config, listener)
    except KeyboardInterrupt:
        sys.exit(130)
