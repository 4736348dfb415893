"""Worker models and the supervisor, driven in-process with real sockets,
real processes and real kernel wakeups (each networking test in its own
network namespace)."""
from __future__ import annotations

import os
import socket

import psutil
import pytest

from reuseport_ctl.errors import UserError
from reuseport_ctl.kernel.sockets import port_holders
from reuseport_ctl.policies import Policy
from reuseport_ctl.workers import http
from reuseport_ctl.workers.counters import ACCEPTS, FIELDS, MAGIC, READY, Counters
from reuseport_ctl.workers.supervisor import (MODELS, RunConfig, Supervisor, client_host,
                                              parse_cpus)

# --- pure logic ---------------------------------------------------------------


@pytest.mark.parametrize("req, keep", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", True),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", True),
    (b"GET / HTTP/1.1\n\n", True),                             # bare LF, as from nc
])
def test_next_request_finds_end_and_keepalive(req, keep):
    want = (len(req), keep)
    assert http.next_request(req) == want
    assert http.next_request(req + b"GET / HTTP/1.1\r\n") == want     # pipelined remainder


@pytest.mark.parametrize("partial", [b"GET / HTTP/1.1\r\nHost: x\r\n",
                                     b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab"])
def test_next_request_waits_for_the_rest(partial):
    assert http.next_request(partial) is None


@pytest.mark.parametrize("bad", [b"hello\r\n\r\n", b"GET /\r\n\r\n",
                                 b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                                 b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                                 b"G" * (http.MAX_HEAD + 1)])
def test_next_request_rejects_garbage(bad):
    with pytest.raises(http.BadRequest):
        http.next_request(bad)


def test_responses_name_the_worker():
    ok, close, bad = http.responses(3, 4242)
    head, body = ok.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nX-Worker: 3\r\n" in head and b"\r\nX-Worker-Pid: 4242\r\n" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"Connection: keep-alive" in head and b"Connection: close" in close
    assert bad.startswith(b"HTTP/1.1 400 ")
    assert http.udp_reply(2, b"ping") == b"worker: 2\nping"


def test_parse_cpus():
    assert parse_cpus("0,1", usable=[0, 1]) == (0, 1)
    assert parse_cpus("0-2,5", usable=[0, 1, 2, 5]) == (0, 1, 2, 5)
    for bad in ("x", "1-0", "-1", "0,,1", ""):
        with pytest.raises(UserError, match="bad CPU list"):
            parse_cpus(bad, usable=[0, 1])
    with pytest.raises(UserError, match="CPU 7 is not online"):
        parse_cpus("0,7", usable=[0, 1])


def test_client_host():
    assert client_host("0.0.0.0") == "127.0.0.1" and client_host("::") == "::1"
    assert client_host("10.1.2.3") == "10.1.2.3"


@pytest.mark.parametrize("cfg, msg", [
    (RunConfig(workers=0), "at least 1"),
    (RunConfig(workers=2, model="nope"), "unknown model"),
    (RunConfig(workers=2, port=70000), "between 0 and 65535"),
    (RunConfig(workers=2, backlog=0), "backlog"),
    (RunConfig(workers=2, model="shared-epoll", policy=Policy("round-robin")), "single socket"),
    (RunConfig(workers=2, policy=Policy("drain", drain=(5,))), "cannot drain worker 5"),
])
def test_run_config_refuses(cfg, msg):
    with pytest.raises(UserError, match=msg):
        cfg.validate()


def test_counters_are_shared_with_a_forked_writer():
    c = Counters(3)
    pid = os.fork()
    if pid == 0:
        c.slot(1).inc(ACCEPTS, 41)
        c.slot(1).inc(ACCEPTS)
        os._exit(0)
    os.waitpid(pid, 0)
    assert c.read(1)["accepts"] == 42
    assert c.read(0)["accepts"] == 0 and c.read(2)["accepts"] == 0
    assert [r["accepts"] for r in c.snapshot()] == [0, 42, 0]     # not the acceptor record
    assert c.acceptor == 3 and set(c.read(c.acceptor)) == set(FIELDS)
    c.close()


def test_counters_layout_has_a_header_another_reader_can_check():
    c = Counters(2)
    again = Counters(2, buf=c._buf)
    c.slot(0).inc(ACCEPTS, 5)
    assert again.read(0)["accepts"] == 5
    assert c._words[0] == MAGIC and c._words[2] == 3 and c._words[3] == len(FIELDS)
    import mmap
    with pytest.raises(ValueError):
        Counters(2, buf=mmap.mmap(-1, 4096))


# --- tiny clients (the load client is tested on its own) ----------------------

def http_conn(host: str, port: int, requests: int = 1, pipelined: bool = False):
    """One connection, `requests` requests (the last says close); the
    (X-Worker, X-Worker-Pid) of each answer."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    reqs = [b"GET / HTTP/1.1\r\nHost: t\r\n" + (b"Connection: close\r\n" if i == requests - 1
                                                 else b"") + b"\r\n" for i in range(requests)]
    out = []
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect((host, port))
        if pipelined:
            s.sendall(b"".join(reqs))
        buf = b""
        for i in range(requests):
            if not pipelined:
                s.sendall(reqs[i])
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(4096)
                assert chunk, "server closed early"
                buf += chunk
            head, buf = buf.split(b"\r\n\r\n", 1)
            hdr = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
            n = int(hdr[b"Content-Length"])
            while len(buf) < n:
                buf += s.recv(4096)
            buf = buf[n:]
            out.append((int(hdr[b"X-Worker"]), int(hdr[b"X-Worker-Pid"])))
        assert s.recv(1) == b""                 # the server closed after "close"
    return out


def udp_ask(host: str, port: int, payload: bytes = b"ping") -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(payload, (host, port))
        data = s.recv(65536)
    head, _, rest = data.partition(b"\n")
    assert head.startswith(b"worker: ") and rest == payload
    return int(head[8:])


def _load(sup: Supervisor, host: str, n: int) -> dict | None:
    """The real load client in a helper process, if it is installed."""
    try:
        from reuseport_ctl.load.client import run_load
    except ImportError:
        return None
    return sup.run_in_child(lambda: run_load(host, sup.port, sup.cfg.proto, conns=n,
                                             concurrency=8).to_dict())


def _counts(sup: Supervisor) -> list[int]:
    return [w["count"] for w in sup.report()["workers"]]


# --- every model, both protocols ----------------------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("model", MODELS)
def test_every_connection_is_counted_and_spread(netns, model, proto):
    n = 240
    with Supervisor(RunConfig(workers=4, port=0, proto=proto, model=model)) as sup:
        sup.start()
        assert sup.wait_ready()
        load = _load(sup, "127.0.0.1", n)
        if load is None:
            for _ in range(n):
                http_conn("127.0.0.1", sup.port) if proto == "tcp" else \
                    udp_ask("127.0.0.1", sup.port)
        else:
            assert load["ok"] == n, load["errors"]
        rep = sup.report()
        sup.stop()
        counts = _counts(sup)
    assert sum(counts) == n, counts
    assert sum(c > 0 for c in counts) > 1, counts
    assert all(w["restarts"] == 0 for w in rep["workers"])
    if load is not None:                        # the replies name the slot that counted
        assert {str(i): c for i, c in enumerate(counts) if c} == load["per_worker"]
    if proto == "tcp":
        assert [w["requests"] for w in rep["workers"]] == counts
    if model == "dispatcher":
        took = rep["acceptor"]["accepts" if proto == "tcp" else "datagrams"]
        assert took == n and max(counts) - min(counts) <= 1        # round-robin
    if model in ("reuseport", "dispatcher", "shared-accept"):
        assert all(w["eagain"] == 0 for w in rep["workers"])        # nobody woken for nothing


@pytest.mark.parametrize("model", MODELS)
def test_keepalive_one_accept_many_requests(netns, model):
    with Supervisor(RunConfig(workers=2, port=0, model=model)) as sup:
        sup.start()
        assert sup.wait_ready()
        served = http_conn("127.0.0.1", sup.port, requests=5)
        piped = http_conn("127.0.0.1", sup.port, requests=3, pipelined=True)
        rep = sup.report()
    assert len(set(served)) == 1 and len(set(piped)) == 1      # one worker kept each connection
    assert sum(w["accepts"] for w in rep["workers"]) == 2
    assert sum(w["requests"] for w in rep["workers"]) == 8
    slot, pid = served[0]
    assert rep["workers"][slot]["pid"] == pid


def test_bad_request_gets_400_and_close(netns):
    with Supervisor(RunConfig(workers=1, port=0)) as sup:
        sup.start()
        assert sup.wait_ready()
        with socket.create_connection(("127.0.0.1", sup.port), timeout=10) as s:
            s.sendall(b"hello there\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    assert data.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in data


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("host, model", [("::1", "reuseport"), ("::", "reuseport"),
                                         ("::", "dispatcher")])
def test_ipv6(netns, host, model, proto):
    with Supervisor(RunConfig(workers=2, host=host, port=0, proto=proto, model=model)) as sup:
        sup.start()
        assert sup.wait_ready()
        assert sup.socks[0].family == socket.AF_INET6
        for _ in range(20):
            http_conn("::1", sup.port) if proto == "tcp" else udp_ask("::1", sup.port)
        if host == "::":            # the wildcard is dual-stack: IPv4 clients reach it too
            http_conn("127.0.0.1", sup.port) if proto == "tcp" else \
                udp_ask("127.0.0.1", sup.port)
        total = sum(_counts(sup))
    assert total == (21 if host == "::" else 20)


def test_specific_address_does_not_answer_on_another(netns):
    import subprocess
    subprocess.run(["ip", "addr", "add", "10.9.0.1/32", "dev", "lo"], check=True)
    with Supervisor(RunConfig(workers=2, host="10.9.0.1", port=0)) as sup:
        sup.start()
        assert sup.wait_ready()
        assert http_conn("10.9.0.1", sup.port)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", sup.port), timeout=5)


def test_restart_keeps_the_same_socket_and_counts(netns):
    with Supervisor(RunConfig(workers=2, port=0)) as sup:
        sup.start()
        assert sup.wait_ready()
        old = sup.pids()[1]
        inode = os.fstat(sup.socks[1].fileno()).st_ino
        os.kill(old, 9)
        for _ in range(100_000):                    # reap and fork a new worker 1
            sup.poll()
            if sup.pids().get(1, old) != old and sup.counters.slot(1).get(READY):
                break
        new = sup.pids()[1]
        child_fds = [os.readlink(f"/proc/{new}/fd/{f}") for f in os.listdir(f"/proc/{new}/fd")
                     if int(f) > 2]
        rep = sup.report()
    assert new != old and rep["workers"][1]["restarts"] == 1 and rep["workers"][1]["pid"] == new
    assert rep["workers"][0]["restarts"] == 0
    sockets = [f for f in child_fds if f.startswith("socket:")]
    assert sockets == [f"socket:[{inode}]"]          # its own socket, nothing else of ours


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_dispatcher_acceptor_is_restarted(netns, proto):
    with Supervisor(RunConfig(workers=2, port=0, proto=proto, model="dispatcher")) as sup:
        sup.start()
        assert sup.wait_ready()
        acceptor = sup.counters.acceptor
        old = sup.pids()[acceptor]
        os.kill(old, 9)
        for _ in range(100_000):
            sup.poll()
            if sup.pids().get(acceptor, old) != old and sup.counters.slot(acceptor).get(READY):
                break
        for _ in range(4):
            http_conn("127.0.0.1", sup.port) if proto == "tcp" else udp_ask("127.0.0.1", sup.port)
        rep = sup.report()
    assert rep["acceptor"]["restarts"] == 1 and rep["acceptor"]["pid"] != old
    assert [w["count"] for w in rep["workers"]] == [2, 2]


def test_stop_reaps_every_child_and_frees_the_port(netns):
    sup = Supervisor(RunConfig(workers=3, port=0, model="dispatcher"))
    with sup:
        sup.start()
        assert sup.wait_ready()
        port = sup.port
        kids = [psutil.Process(p) for p in sup.pids().values()]
        assert len(kids) == 4                       # 3 workers and the acceptor
        http_conn("127.0.0.1", port)
    assert not psutil.Process().children()
    assert not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids)
    assert port_holders("tcp", port) == []
    with socket.socket() as s:                  # nothing listens there any more; REUSEADDR
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # for our TIME_WAITs
        s.bind(("127.0.0.1", port))
        s.listen()


def test_workers_pinned_round_robin(netns):
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    with Supervisor(RunConfig(workers=3, port=0, cpus=cpus)) as sup:
        sup.start()
        assert sup.wait_ready()
        got = {i: os.sched_getaffinity(p) for i, p in sup.pids().items()}
    assert got == {i: {cpus[i % len(cpus)]} for i in range(3)}


def test_policy_objects_are_released(netns):
    pytest.importorskip("reuseport_ctl.policies.selector")

    def bpf_fds():
        out = []
        for f in os.listdir("/proc/self/fd"):
            try:
                out.append(os.readlink(f"/proc/self/fd/{f}"))
            except OSError:
                pass
        return [t for t in out if "bpf" in t]
    before = bpf_fds()
    with Supervisor(RunConfig(workers=2, port=0, policy=Policy("round-robin"))) as sup:
        sup.start()
        assert sup.wait_ready()
        for _ in range(10):
            http_conn("127.0.0.1", sup.port)
        assert len(bpf_fds()) > len(before)
        sup.stop()
        assert sum(sup.report()["selections"]) == 10
    assert bpf_fds() == before and not psutil.Process().children()


def test_user_needs_root(netns):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                    # not root any more, only in this child
        try:
            os.seteuid(65534)
            with Supervisor(RunConfig(workers=1, port=0, user="root")) as sup:
                sup.start()
            os.write(w, b"started")
        except UserError as e:
            os.write(w, str(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    said = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert said.startswith("--user needs root")


def test_worker_dying_before_ready_is_not_restarted_forever(netns, monkeypatch, capfd):
    from reuseport_ctl.workers import models

    def broken(*args):
        raise RuntimeError("boom")
    monkeypatch.setattr(models, "run_worker", broken)
    with Supervisor(RunConfig(workers=2, port=0)) as sup:
        sup.start()
        with pytest.raises(UserError, match="died before it was ready 3 times"):
            sup.wait_ready()
    assert "worker 0: RuntimeError: boom" in capfd.readouterr().err
    assert not psutil.Process().children()


def test_a_worker_killed_from_outside_is_not_said_to_have_printed_an_error():
    from reuseport_ctl.workers.supervisor import _death
    assert "killed by signal 9 (SIGKILL)" in _death(9)
    assert "error is above" not in _death(9)
    assert _death(3 << 8) == "last exit status 3; its error is above"
