"""What a watch refuses before it attaches anything: one sentence each."""
from __future__ import annotations

import math
from typing import Optional

from ..errors import UserError
from ..groups import other_proto
from ..kernel import caps

def require_probe_caps() -> None:
    missing = caps.missing(("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"))
    if missing:
        raise UserError(f"watch attaches BPF probes and needs root (this process lacks "
                        f"{', '.join(missing)}): run it with sudo.")


def check_options(port: int, interval: float, duration: Optional[float],
                  prometheus: Optional[str] = None) -> None:
    if not interval > 0:
        raise UserError(f"--interval must be positive, not {interval}.")
    if not interval <= 3600:
        raise UserError(f"--interval must be at most 3600 seconds, not {interval}.")
    if duration is not None and not math.isfinite(duration):
        raise UserError(f"--duration must be a finite number of seconds, not {duration} "
                        f"(without it the watch runs until q, Ctrl-C or SIGTERM).")
    if interval < 0.1:
        raise UserError(f"--interval {interval} is shorter than 0.1 s: reading every probe "
                        f"that often costs more than it shows.")
    if duration is not None and not duration > 0:
        raise UserError(f"--duration must be positive, not {duration}.")
    if not 0 < port < 65536:
        raise UserError(f"port {port} is not a port number (1-65535).")
    if prometheus is not None:
        from ..export.prometheus import parse_listen
        parse_listen(prometheus)


def nothing_listening(port: int, proto: str) -> UserError:
    what = "listening TCP" if proto == "tcp" else "bound UDP"
    other = other_proto(port, proto)
    return UserError(f"nothing is listening on {proto} port {port} (no {what} socket in "
                     f"this network namespace){other or '; --wait waits for it'}.")


def gone(port: int, proto: str) -> UserError:
    return UserError(f"nothing listens on {proto} port {port} any more, so the watch ends "
                     f"(--wait keeps watching until something does).")
