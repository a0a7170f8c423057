"""A stand-in for Claude Code's OAuth token endpoint (platform.claude.com/v1/oauth/token), for tests.

`python fake_oauth.py --cert C --key K --access A --refresh R --log L.jsonl` serves HTTPS on
127.0.0.1:443 (run it in a private network namespace, where that name points here). A refresh
request gets the tokens given (`expires_in` eight hours); each request is logged as one JSON
line with the names of its fields, never their values.
"""

from __future__ import annotations

import argparse
import json
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Handler(BaseHTTPRequestHandler):
    server: TokenServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            fields = json.loads(body or b"{}")
        except ValueError:
            fields = {}
        with self.server.log.open("a") as log:
            log.write(
                json.dumps({"path": self.path, "fields": sorted(fields), "grant": fields.get("grant_type")}) + "\n"
            )
        reply = json.dumps(
            {
                "access_token": self.server.access,
                "refresh_token": self.server.refresh,
                "expires_in": 8 * 3600,
                "scope": "user:inference",
                "token_type": "Bearer",
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the http.server API
        pass


class TokenServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, access: str, refresh: str, log: Path) -> None:
        super().__init__(("127.0.0.1", 443), Handler)
        self.access, self.refresh, self.log = access, refresh, log


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--cert", "--key", "--access", "--refresh", "--log"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()
    server = TokenServer(args.access, args.refresh, Path(args.log))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
