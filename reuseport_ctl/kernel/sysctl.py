"""Read and write sysctls through /proc/sys, and change one for a while.

net.* sysctls belong to the network namespace of the process that opens the
file: inside a private namespace (the experiments' default) only that
namespace changes. Still, `setting()` puts the old value back whatever
happens: a normal exit, an exception, Ctrl-C, or SIGTERM turned into an
exception by the caller.

    with setting("net.ipv4.tcp_migrate_req", 1):
        ...
"""
from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from ..errors import UserError

ROOT = Path("/proc/sys")


def path_of(name: str) -> Path:
    """net.ipv4.tcp_migrate_req -> /proc/sys/net/ipv4/tcp_migrate_req."""
    if not name or name.startswith((".", "/")) or ".." in name:
        raise UserError(f"malformed sysctl name {name!r}.")
    return ROOT / name.replace(".", "/")


def read(name: str) -> str:
    try:
        return path_of(name).read_text().strip()
    except FileNotFoundError:
        raise UserError(f"this kernel has no sysctl {name}.") from None
    except PermissionError:
        raise UserError(f"cannot read sysctl {name}: permission denied.") from None


def write(name: str, value: Union[str, int]) -> None:
    try:
        path_of(name).write_text(f"{value}\n")
    except FileNotFoundError:
        raise UserError(f"this kernel has no sysctl {name}.") from None
    except PermissionError:
        raise UserError(f"cannot set sysctl {name}: run as root "
                        f"(CAP_NET_ADMIN in this network namespace).") from None
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise UserError(f"the kernel refused {name} = {value}.") from None
        raise


@contextmanager
def setting(name: str, value: Union[str, int]) -> Iterator[str]:
    """Set `name` to `value` inside the block; yields the old value and
    writes it back on the way out (only if we changed it)."""
    old = read(name)
    new = str(value)
    if new == old:
        yield old
        return
    write(name, new)
    try:
        yield old
    finally:
        write(name, old)
