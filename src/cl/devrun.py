"""`make run`: both daemons in the foreground, no root, no systemd. Ctrl-C stops both."""

from __future__ import annotations

import signal
import subprocess
import sys


def main() -> int:
    daemons = [
        subprocess.Popen([sys.executable, "-c", f"from cl.{m} import main; main()"]) for m in ("balancer", "rescue")
    ]

    def forward(signum: int, _frame: object) -> None:
        for process in daemons:
            process.send_signal(signum)

    # Ctrl-C reaches the daemons directly (same process group); SIGTERM is passed on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, forward)
    codes = [process.wait() for process in daemons]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
