"""A private network namespace for the experiments: nothing they bind or
send touches the host's ports or interfaces."""
from __future__ import annotations

import ctypes
import os

from ..errors import UserError

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter_private_netns() -> None:
    """Move this process (and every child it starts from now on) into a new
    network namespace with the loopback up."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise UserError(f"cannot create a private network namespace "
                        f"({os.strerror(err)}): run as root, or pass --host-netns.")
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
