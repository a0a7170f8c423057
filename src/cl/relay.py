"""`relay.py HOST:PORT SOCKET -- COMMAND...`: the gateway inside a CLI's view with a network of its own.

With `cli_network = "gateway"` a CLI's view has its own network namespace: loopback and nothing
else. This script, run there by the view's own `python3` (the standard library only: nothing of
cl is in the view), listens on HOST:PORT (the gateway's address, so the CLI's ANTHROPIC_BASE_URL
is unchanged), then forks: the child relays each connection to SOCKET (cl-gateway's socket for the
CLIs, bound into the view), the parent becomes COMMAND. Everything ends with the view's PID
namespace when COMMAND exits.
"""

import contextlib
import os
import socket
import sys
import threading


def pipe(source: socket.socket, target: socket.socket) -> None:
    """One direction, until its end: then the other side hears the end of it (a half-close)."""
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            target.sendall(data)
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)


def relay(client: socket.socket, path: str) -> None:
    with client, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gateway:
        try:
            gateway.connect(path)
        except OSError:
            return
        back = threading.Thread(target=pipe, args=(gateway, client), daemon=True)
        back.start()
        pipe(client, gateway)
        back.join()


def serve(listener: socket.socket, path: str) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the CLI's streams are the CLI's: the relay holds none of them open
        os.dup2(devnull, fd)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=relay, args=(client, path), daemon=True).start()


def main(argv: list[str]) -> None:
    address, path, separator, *command = argv
    if separator != "--" or not command:
        raise SystemExit("usage: relay.py HOST:PORT SOCKET -- COMMAND...")
    host, _, port = address.rpartition(":")
    listener = socket.create_server((host.strip("[]"), int(port)), reuse_port=False)
    if os.fork() == 0:
        serve(listener, path)
    listener.close()
    os.execvp(command[0], command)  # noqa: S606 - the CLI's own command line, as the worker built it


if __name__ == "__main__":
    main(sys.argv[1:])
