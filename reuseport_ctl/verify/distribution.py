"""A reuseport group with no program spreads flows over every member: the
kernel hashes the 4-tuple (reuseport_select_sock_by_hash). TCP and UDP;
IPv4, IPv6, and a dual-stack IPv6 group receiving IPv4 (v4-mapped)."""
from __future__ import annotations

from ..kernel import features as F
from .checks import expect, register
from .net import FAMILIES, REFUSED, TCP, UDP, Family, Pool, counts, flows

MEMBERS = 4
FLOWS = 64     # P(some member of 4 gets none of 64 uniform flows) < 1e-7


def spread(proto: str, fam: Family, members: int = MEMBERS, n_flows: int = FLOWS,
           expect_members: int | None = None, sabotage=None) -> str:
    """Send n_flows flows from distinct source ports to a group of `members`
    sockets; every flow must be received, and by the end `expect_members`
    (default: all) members must have received at least one.
    sabotage(socks): a hook run on the group first (tests use it to break
    the property and see the check fail)."""
    want = members if expect_members is None else expect_members
    with Pool() as pool:
        socks, port = pool.group(proto, fam, members)
        if sabotage:
            sabotage(socks)
        seen = flows(pool, proto, fam, socks, port, count=n_flows)
        lost = sum(1 for x in seen if x is None or x == REFUSED)
        expect(lost == 0, f"{proto} {fam.name} flows received", f"{n_flows - lost}/{n_flows}",
               f"{n_flows}/{n_flows}")
        per = counts(seen, members)
        reached = sum(1 for c in per if c)
        expect(reached >= want, f"members that received flows (per member {per})",
               reached, f"{want} of {members}")
        return f"{n_flows} {proto} {fam.name} flows over {members} members: {per}"


def _make(proto: str, fam: Family):
    def fn(ctx):
        return spread(proto, fam)
    return fn


for _proto in (TCP, UDP):
    for _fam in FAMILIES:
        register(f"{_proto}-{_fam.name}-distribution", _make(_proto, _fam),
                 selftest=None, needs=(F.SO_REUSEPORT,),
                 doc=f"With no steering program, a {_proto.upper()} {_fam.name} reuseport "
                     f"group of {MEMBERS} spreads {FLOWS} flows from distinct source ports "
                     f"over every member (the kernel's 4-tuple hash), losing none.")
