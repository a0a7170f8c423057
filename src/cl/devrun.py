"""`make run`: the daemons in the foreground, no root, no systemd. Ctrl-C stops them all.

cl-gateway runs beside the balancer and the rescuer unless the configuration says `gateway = false`.
"""

from __future__ import annotations

import signal
import subprocess
import sys

from cl.config import ConfigError, load_config


def main() -> int:
    modules = ["balancer", "rescue"]
    try:
        if load_config(keys={"gateway"}).gateway:
            modules.append("gateway.main")
    except ConfigError as exc:
        print(f"cl: {exc}", file=sys.stderr)
        return 2
    daemons = [subprocess.Popen([sys.executable, "-c", f"from cl.{m} import main; main()"]) for m in modules]

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
