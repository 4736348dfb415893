"""sock_diag: per-socket drop counters (sk_drops), the member-health figure."""
from __future__ import annotations

import socket
import sys
import time

from reuseport_ctl.kernel import diag


def test_drops_parsed_from_skmeminfo_hex():
    words = [0] * 9
    words[diag.SK_MEMINFO_DROPS] = 70000
    raw = b"".join(w.to_bytes(4, sys.byteorder) for w in words)
    assert diag._drops(":".join(f"{b:02x}" for b in raw)) == 70000
    assert diag._drops(None) is None
    assert diag._drops("00:01") is None            # a kernel with a shorter array


def test_tcp_listener_counts_handshakes_dropped_on_a_full_accept_queue(netns):
    ls = socket.socket()
    ls.bind(("127.0.0.1", 7001))
    ls.listen(0)                                   # an accept queue of one
    clients = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", 7001))
        clients.append(c)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        (l,) = diag.listeners(7001)
        if l.drops:
            break
        time.sleep(0.05)
    assert l.queue_len == 1 and l.drops > 0
    for c in clients:
        c.close()
    ls.close()


def test_udp_socket_counts_datagrams_dropped_on_a_full_receive_buffer(netns):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)   # the kernel's minimum
    u.bind(("127.0.0.1", 7002))
    (before,) = diag.listeners(7002, "udp")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(200):
        s.sendto(b"x" * 1000, ("127.0.0.1", 7002))
    got = 0
    u.setblocking(False)
    try:
        while True:
            u.recv(2000)
            got += 1
    except BlockingIOError:
        pass
    (after,) = diag.listeners(7002, "udp")
    assert before.drops == 0
    assert after.drops == 200 - got > 0              # every datagram is read or dropped
    u.close()
    s.close()
