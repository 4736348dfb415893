"""The napi policy (bpf/select.c, P_NAPI): each connection goes to the member
its NAPI id was given, so every member is fed by one NAPI instance (one
receive queue), as socket(7) suggests for busy polling. Proved on a veth
pair with GRO on (veth then receives through one NAPI instance per rx queue,
with real NAPI ids): the server's accepted sockets say by SO_INCOMING_NAPI_ID
which NAPI each came through. Without NAPI ids (plain veth) the policy has
nothing to steer by: the kernel's hash decides, and that is counted."""
from __future__ import annotations

import socket
import subprocess
import sys

from reuseport_ctl.kernel.sockets import incoming
from reuseport_ctl.policies import parse_policy
from reuseport_ctl.policies.selector import attach_policy, read_napi_order, read_no_napi
from test_watch_rx import QUEUES, SERVER, sh, veth  # noqa: F401 (a fixture)

PORT = 9310
CONNS = 40
MEMBERS = 2


def listeners(n: int, host: str = SERVER) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, PORT))
        s.listen(512)
        out.append(s)
    return out


def steer(peer: str) -> tuple[list[list[int]], dict, int, list[int]]:
    """CONNS connections from peer through the napi policy: per member the
    NAPI ids it got, the policy's NAPI id order, its no-NAPI count and its
    selections."""
    socks = listeners(MEMBERS)
    sel = attach_policy(parse_policy("napi"), socks)
    try:
        connect_all(peer, CONNS)
        return (accepted(socks), read_napi_order(sel.maps["napi"]),
                read_no_napi(sel.maps["config"]), sel.selections())
    finally:
        sel.close()
        for s in socks:
            s.close()


def connect_all(peer: str, n: int) -> None:
    """n connections from the client namespace, each over its own 4-tuple
    (so the sender's tx queue, hence the veth rx queue, varies)."""
    code = ("import socket\n"
            f"cs = [socket.create_connection(({SERVER!r}, {PORT}), timeout=5) "
            f"for _ in range({n})]\n")
    subprocess.run(["nsenter", f"--net=/run/netns/{peer}", sys.executable, "-c", code],
                   check=True, timeout=30)


def accepted(socks: list[socket.socket]) -> list[list[int]]:
    """Per member, the NAPI id of each connection queued on it."""
    out = []
    for s in socks:
        s.setblocking(False)
        ids = []
        while True:
            try:
                c, _ = s.accept()
            except BlockingIOError:
                break
            ids.append(incoming(c)[0])
            c.close()
        out.append(ids)
    return out


def test_napi_policy_feeds_each_member_from_one_napi(veth):  # noqa: F811
    sh("ethtool", "-K", "va", "gro", "on")
    sh("ip", "netns", "exec", veth, "ethtool", "-K", "vb", "tso", "off", "gso", "off")
    got, order, no_napi, selections = steer(veth)
    assert sum(map(len, got)) == CONNS and no_napi == 0
    assert sum(selections) == CONNS
    seen = {i for ids in got for i in ids}
    # each connection has its own tx hash, so both queues (NAPI ids) carry some
    assert 0 not in seen and seen == set(order) and len(seen) == QUEUES
    for slot, ids in enumerate(got):
        # every connection of a member came through the one NAPI id given it
        assert {order[i] % MEMBERS for i in ids} <= {slot}, (slot, ids, order)
        assert len(set(ids)) == 1
    assert [len(ids) for ids in got] == selections


def test_napi_policy_without_napi_ids_leaves_it_to_the_kernel(veth):  # noqa: F811
    got, order, no_napi, selections = steer(veth)
    assert sum(map(len, got)) == CONNS
    assert {i for ids in got for i in ids} == {0}      # SO_INCOMING_NAPI_ID: none
    assert no_napi == CONNS and sum(selections) == 0 and order == {}


def test_status_says_how_many_had_no_napi_id(netns, cli):
    import json
    socks = listeners(MEMBERS, "127.0.0.1")
    try:
        cli("attach", "--port", PORT, "--policy", "napi", check=True)
        for _ in range(5):              # loopback: no NAPI
            socket.create_connection(("127.0.0.1", PORT)).close()
        d = json.loads(cli("status", "--port", PORT, "--json", check=True).stdout)
        text = cli("status", "--port", PORT, check=True).stdout
    finally:
        cli("detach", "--port", PORT)
        for s in socks:
            s.close()
    assert d["policy"] == "napi" and d["no_napi"] == 5 and d["total"] == 0
    assert "5 connections came with no NAPI id" in text
