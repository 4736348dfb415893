"""The built-in load client against small real servers in a fresh netns.

Servers are forked processes (not threads: the client forks too), each with
its own SO_REUSEPORT socket, answering with its number so the client's
per-worker counts can be checked against who really answered.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct

import pytest

from reuseport_ctl.errors import UserError
from reuseport_ctl.load import http
from reuseport_ctl.load.client import run_load
from reuseport_ctl.load.latency import percentiles
from reuseport_ctl.load.plan import lanes_per_process, split


# ---------------------------------------------------------------- servers

def _http_worker(sock: socket.socket, n: int) -> None:
    """Minimal epoll HTTP/1.1 server: keep-alive unless asked to close."""
    body = b"hello\n"
    ep = select.epoll()
    sock.setblocking(False)
    ep.register(sock.fileno(), select.EPOLLIN)
    conns: dict[int, tuple[socket.socket, bytearray]] = {}
    while True:
        for fd, _ in ep.poll():
            if fd == sock.fileno():
                while True:
                    try:
                        c, _ = sock.accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    conns[c.fileno()] = (c, bytearray())
                    ep.register(c.fileno(), select.EPOLLIN)
                continue
            c, buf = conns[fd]
            try:
                data = c.recv(65536)
            except OSError:
                data = b""
            buf += data
            close = not data
            while b"\r\n\r\n" in buf:
                end = buf.index(b"\r\n\r\n") + 4
                req, buf[:] = bytes(buf[:end]), buf[end:]
                close = b"connection: close" in req.lower()
                hdr = b"Connection: close\r\n" if close else b""
                c.sendall(b"HTTP/1.1 200 OK\r\nX-Worker: %d\r\nContent-Length: %d\r\n%s\r\n%s"
                          % (n, len(body), hdr, body))
            if close:
                ep.unregister(fd)
                del conns[fd]
                c.close()


def _udp_worker(sock: socket.socket, n: int) -> None:
    while True:
        data, peer = sock.recvfrom(65536)
        sock.sendto(b"worker: %d\n" % n + data, peer)


def _reset_worker(sock: socket.socket, n: int) -> None:
    while True:
        c, _ = sock.accept()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()


@contextlib.contextmanager
def serve(body, workers: int = 2, kind=socket.SOCK_STREAM, host="127.0.0.1"):
    """Fork `workers` processes, each owning one SO_REUSEPORT socket on the
    same port; yields the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    for _ in range(workers):
        s = socket.socket(family, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, socks[0].getsockname()[1] if socks else 0))
        if kind == socket.SOCK_STREAM:
            s.listen(1024)
        socks.append(s)
    port = socks[0].getsockname()[1]
    pids = []
    try:
        for n, s in enumerate(socks):
            pid = os.fork()
            if pid == 0:
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    body(s, n)
                finally:
                    os._exit(0)
            pids.append(pid)
        for s in socks:         # all bound and listening before the load starts
            s.close()
        yield port
    finally:
        for s in socks:
            s.close()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _accounted(r):
    assert set(r.errors) >= {"refused", "reset", "timeout", "other"}
    assert r.ok + sum(r.errors.values()) == r.conns


# ---------------------------------------------------------------- networking

def test_tcp_short_connections_reach_every_worker(netns):
    with serve(_http_worker, workers=3) as port:
        r = run_load("127.0.0.1", port, conns=2000, concurrency=16)
    _accounted(r)
    assert r.ok == 2000, r.errors
    assert sum(r.per_worker.values()) == 2000
    assert set(r.per_worker) == {"0", "1", "2"}
    assert 0 < r.latency_ms["p50"] <= r.latency_ms["p90"] <= r.latency_ms["p99"] <= r.latency_ms["max"]
    assert r.rate > 0 and r.elapsed_s > 0


def test_tcp_keep_alive_counts_every_response(netns):
    with serve(_http_worker, workers=2) as port:
        r = run_load("127.0.0.1", port, conns=300, concurrency=8, requests_per_conn=5)
    _accounted(r)
    assert r.ok == 300, r.errors
    assert sum(r.per_worker.values()) == 5 * 300
    assert set(r.per_worker) == {"0", "1"}
    assert r.requests == 5 * 300                      # requests/s is what wrk users compare
    assert abs(r.requests_rate - 5 * r.rate) <= 0.01 * r.rate * 5    # the same elapsed time


def test_tcp_ipv6(netns):
    with serve(_http_worker, workers=2, host="::1") as port:
        r = run_load("::1", port, conns=200, concurrency=4)
    assert r.ok == 200, r.errors


def test_tcp_pinned_source_ports_repeat_the_same_flows(netns):
    # Same 4-tuples twice -> the kernel's hash sends each to the same worker.
    ports = list(range(40000, 40032))
    with serve(_http_worker, workers=4) as port:
        a = run_load("127.0.0.1", port, conns=128, concurrency=8, source_ports=ports)
        b = run_load("127.0.0.1", port, conns=128, concurrency=8, source_ports=ports)
    assert a.ok == b.ok == 128, (a.errors, b.errors)
    assert a.per_worker == b.per_worker


def test_udp_echo_counts_datagrams_per_worker(netns):
    with serve(_udp_worker, workers=3, kind=socket.SOCK_DGRAM) as port:
        r = run_load("127.0.0.1", port, proto="udp", conns=1000, concurrency=16)
    _accounted(r)
    assert r.ok == 1000, r.errors
    assert sum(r.per_worker.values()) == 1000
    assert set(r.per_worker) == {"0", "1", "2"}


def test_udp_unanswered_is_timeout(netns):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # bound, never answers
    s.bind(("127.0.0.1", 0))
    try:
        r = run_load("127.0.0.1", s.getsockname()[1], proto="udp", conns=20,
                     concurrency=4, timeout=0.2)
    finally:
        s.close()
    assert r.errors["timeout"] == 20 and r.ok == 0


def test_nothing_listening_is_refused_not_an_exception(netns):
    r = run_load("127.0.0.1", 9, conns=300, concurrency=16)
    _accounted(r)
    assert r.errors["refused"] == 300
    assert r.ok == 0 and r.per_worker == {}


def test_server_that_resets(netns):
    with serve(_reset_worker, workers=2) as port:
        r = run_load("127.0.0.1", port, conns=200, concurrency=8)
    _accounted(r)
    assert r.errors["reset"] > 0
    assert r.ok == 0


def test_non_2xx_is_other(netns):
    def not_found(sock, n):
        while True:
            c, _ = sock.accept()
            c.recv(4096)
            c.sendall(b"HTTP/1.1 404 Not Found\r\nX-Worker: 7\r\nContent-Length: 0\r\n\r\n")
            c.close()
    with serve(not_found, workers=1) as port:
        r = run_load("127.0.0.1", port, conns=50, concurrency=4)
    assert r.errors["other"] == 50 and r.per_worker == {"7": 50}


def test_progress_reaches_the_total(netns):
    seen = []
    with serve(_http_worker, workers=2) as port:
        run_load("127.0.0.1", port, conns=500, concurrency=8, progress=seen.append)
    assert seen and seen[-1] == 500 and seen == sorted(seen)


def test_no_child_or_fd_left_behind(netns):
    before = set(os.listdir("/proc/self/fd"))
    run_load("127.0.0.1", 9, conns=50, concurrency=4)
    assert set(os.listdir("/proc/self/fd")) == before
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_duration_decides_when_to_stop(netns):
    """--duration without a count: connections keep starting until the time
    is up, every one of them is accounted for, and the run lasts that long
    (it cannot end before: the last connections start at the deadline)."""
    with serve(_http_worker, workers=2) as port:
        r = run_load("127.0.0.1", port, conns=None, duration=1.0, concurrency=4)
        both = run_load("127.0.0.1", port, conns=30, duration=30.0, concurrency=4)
    _accounted(r)
    assert r.ok == r.conns > 0 and sum(r.per_worker.values()) == r.ok
    assert r.elapsed_s >= 0.95
    assert both.conns == both.ok == 30          # the count ran out first


def test_cli_duration(netns, cli):
    with serve(_http_worker, workers=2) as port:
        p = cli("load", "--port", port, "--duration", 1, "--json", check=True)
    d = json.loads(p.stdout)
    assert d["ok"] == d["conns"] > 0 and d["elapsed_s"] >= 0.95


@pytest.mark.parametrize("kw, words", [
    (dict(host="no-such-host.invalid", port=80), "resolve"),
    (dict(host="127.0.0.1", port=70000), "port"),
    (dict(host="127.0.0.1", port=80, conns=0), "conns"),
    (dict(host="127.0.0.1", port=80, concurrency=0), "concurrency"),
    (dict(host="127.0.0.1", port=80, proto="sctp"), "protocol"),
    (dict(host="127.0.0.1", port=80, duration=0), "duration"),
    (dict(host="127.0.0.1", port=80, conns=None), "a duration"),
])
def test_bad_input_is_a_user_error(netns, kw, words):
    with pytest.raises(UserError, match=words):
        run_load(**kw)


def test_cli_json(netns, cli):
    with serve(_http_worker, workers=2) as port:
        p = cli("load", "--port", port, "--conns", 400, "--concurrency", 8, "--json", check=True)
    d = json.loads(p.stdout)
    for k in ("proto", "host", "port", "conns", "ok", "errors", "elapsed_s", "rate",
              "latency_ms", "per_worker", "fairness", "requests", "requests_rate"):
        assert k in d
    assert d["ok"] == 400 and sum(d["per_worker"].values()) == 400
    assert set(d["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "max"}
    lat = d["latency_ms"]
    assert lat["p50"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    cdf = d["latency_cdf"]
    assert cdf[-1] == [100.0, lat["max"]] and [q for q, _ in cdf] == sorted(q for q, _ in cdf)
    assert all(a[1] <= b[1] for a, b in zip(cdf, cdf[1:]))


def test_cli_table_and_bad_port(netns, cli):
    with serve(_udp_worker, workers=2, kind=socket.SOCK_DGRAM) as port:
        p = cli("load", "--port", port, "--proto", "udp", "--conns", 200, check=True)
    assert "p99" in p.stdout and "Jain" in p.stdout
    bad = cli("load", "--port", 70000)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    unresolved = cli("load", "--host", "no-such-host.invalid", "--port", 80)
    assert unresolved.returncode != 0 and "resolve" in unresolved.stderr
    assert "Traceback" not in unresolved.stderr


# ---------------------------------------------------------------- pure logic

def test_percentiles_nearest_rank():
    p = percentiles(range(1, 101))
    assert p == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0, "max": 7.0}
    assert percentiles([3, 1, 2, 4])["p50"] == 2.0


def test_percentiles_empty_and_invalid():
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    with pytest.raises(ValueError):
        percentiles([1.0], qs=(0,))


def test_http_head_and_content_length():
    buf = b"HTTP/1.1 200 OK\r\nx-worker:  3 \r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1"
    h = http.parse_head(buf)
    assert (h.status, h.worker, h.close) == (200, "3", False)
    assert http.body_end(buf, h) == buf.index(b"hello") + 5
    assert http.parse_head(b"HTTP/1.1 200 OK\r\nX-Wor") is None
    assert http.body_end(buf[:-10], h) is None


def test_http_chunked_close_and_errors():
    buf = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    h = http.parse_head(buf)
    assert http.body_end(buf, h) == len(buf)
    assert http.body_end(buf[:-2], h) is None
    h = http.parse_head(b"HTTP/1.0 404 Nope\r\n\r\n")
    assert h.close and h.status == 404 and h.length == http.UNTIL_CLOSE
    assert http.parse_head(b"HTTP/1.1 204 No\r\nConnection: close\r\n\r\n").length == 0
    with pytest.raises(http.HttpError):
        http.parse_head(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(http.HttpError):
        http.parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")


def test_plan_unpinned_covers_each_index_once():
    plan = lanes_per_process(conns=101, concurrency=7, processes=3)
    assert [len(lanes) for lanes in plan] == split(7, 3) == [3, 2, 2]
    seen = [i for lanes in plan for i in lanes[0]]   # lanes of a process share one iterator
    assert sorted(seen) == list(range(101))


def test_plan_pinned_gives_each_port_to_one_lane():
    plan = lanes_per_process(conns=50, concurrency=4, processes=2, nports=6)
    owner = {}
    total = 0
    for p, lanes in enumerate(plan):
        for j, lane in enumerate(lanes):
            for i in lane:
                total += 1
                assert owner.setdefault(i % 6, (p, j)) == (p, j)
    assert total == 50 and len(owner) == 6


def test_latency_cdf_and_per_mille():
    from reuseport_ctl.load.latency import latency_cdf
    xs = list(range(1, 1001))
    assert percentiles(xs, (50, 99, 99.9))["p99.9"] == 999.0
    cdf = latency_cdf(xs)
    assert cdf[0] == [1.0, 10.0] and [99.9, 999.0] in cdf and cdf[-1] == [100.0, 1000.0]
    assert latency_cdf([]) == []


@pytest.mark.parametrize("sig, ignored", [(signal.SIGINT, False), (signal.SIGTERM, False),
                                         (signal.SIGINT, True)])
def test_a_stopping_signal_prints_what_was_done_and_exits_128_plus_n(netns, sig, ignored):
    """Ctrl-C (or SIGTERM) on a long `load`: the connections finished so far
    are reported (every one accounted for), then the exit status is 128 + N;
    also when SIGINT came ignored (a background job of a non-interactive shell)."""
    import subprocess
    import sys
    import time
    exe = os.path.join(os.path.dirname(sys.executable), "reuseport-ctl")
    with serve(_http_worker) as port:
        p = subprocess.Popen([exe, "load", "--port", str(port), "--duration", "60", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
                             if ignored else None)
        try:
            time.sleep(2)                   # under way (not an assertion)
            p.send_signal(sig)
            out, err = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
    assert p.returncode == 128 + sig, err
    d = json.loads(out)
    assert d["interrupted"] == sig and d["ok"] > 0
    assert d["ok"] + sum(d["errors"].values()) == d["conns"]
    assert sum(d["per_worker"].values()) == d["ok"]
