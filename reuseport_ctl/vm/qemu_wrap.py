"""A qemu-system-x86_64 in front of the real one, on vng's PATH only.

vng sends the guest's serial console (ttyS0: early boot, kernel messages,
panics) to /dev/null unless --verbose, and with --verbose mixes it into the
command's stderr. A second serial port does not help (the 8250 driver has one
console for all its ports). So this wrapper swaps vng's
`-chardev file,id=console,path=/dev/null` for a file of ours
($REUSEPORT_CTL_VM_CONSOLE), then execs the real QEMU with the same pid (so it
stays in the runner's process group). Every other argument is passed as is.

With `vm --nic-queues N` it also enters the NIC's private network namespace
($REUSEPORT_CTL_VM_NETNS, a /proc/PID/ns/net of the runner's nethost) and
appends the NIC's arguments ($REUSEPORT_CTL_VM_QEMU_ARGS, a JSON list), so
QEMU attaches the tap's queues there and the host's network is untouched.

With $REUSEPORT_CTL_VM_STATUS (a file) it adds a virtio-serial port named
reuseport-ctl.status writing to that file: the guest relay's report of how
many bytes the command wrote (see guest_relay.py). A file chardev never
blocks, so the line is on the host when the guest's write() returns.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from .guest_relay import STATUS_PORT

NAME = "qemu-system-x86_64"


def real_qemu(own_dir: str) -> str | None:
    path = [p for p in os.environ.get("PATH", "").split(":")
            if p and os.path.realpath(p) != os.path.realpath(own_dir)]
    return shutil.which(NAME, path=":".join(path))


def rewrite(args: list[str], console: str | None) -> list[str]:
    if not console:
        return list(args)
    return [f"file,id=console,path={console}" if a == "file,id=console,path=/dev/null" else a
            for a in args]


def status_args(path: str | None) -> list[str]:
    if not path:
        return []
    return ["-device", "virtio-serial-pci,id=rctlser",
            "-chardev", f"file,id=rctlstatus,path={path}",
            "-device", f"virtserialport,bus=rctlser.0,name={STATUS_PORT},chardev=rctlstatus"]


def main() -> None:
    own = os.environ.get("REUSEPORT_CTL_VM_BIN", os.path.dirname(os.path.abspath(sys.argv[0])))
    real = os.environ.get("REUSEPORT_CTL_VM_QEMU") or real_qemu(own)
    if not real:
        sys.exit(f"{NAME}: the real QEMU is not on PATH (apt-get install qemu-system-x86)")
    args = rewrite(sys.argv[1:], os.environ.get("REUSEPORT_CTL_VM_CONSOLE"))
    args += status_args(os.environ.get("REUSEPORT_CTL_VM_STATUS"))
    args += json.loads(os.environ.get("REUSEPORT_CTL_VM_QEMU_ARGS") or "[]")
    netns = os.environ.get("REUSEPORT_CTL_VM_NETNS")
    if netns:
        from ..kernel.tap import enter_net
        try:
            enter_net(netns)
        except OSError as e:
            sys.exit(f"{NAME}: cannot enter the NIC's network namespace ({e.strerror})")
    os.execv(real, [real, *args])


if __name__ == "__main__":
    main()
