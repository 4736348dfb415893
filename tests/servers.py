"""Real servers of the shapes `watch` meets, for the tests: HAProxy with a
thread per SO_REUSEPORT socket, a threaded Python server of the same shape,
a Python dispatcher (the parent accepts and hands each connection to a
child over SCM_RIGHTS) and Node's cluster (the same, by Node's design)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from nginx import answers as _answers      # one HTTP probe for every server

HAPROXY = "/usr/sbin/haproxy"
NODE = "/usr/bin/node"

HAPROXY_CONF = """\
global
    nbthread {threads}
    # bound to thread 1, so each query adds exactly one to thread 1's accepted
    stats socket {sock} mode 600 level admin thread 1
defaults
    mode http
    timeout client 10s
    timeout server 10s
    timeout connect 10s
frontend fe
    bind 127.0.0.1:{port} shards by-thread
    http-request return status 200
"""




def _stop(p: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait(p: subprocess.Popen, ok, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not ok():
        if p.poll() is not None or time.monotonic() > deadline:
            out = p.stdout.read().decode(errors="replace") if p.stdout and p.poll() is not None \
                else ""
            raise AssertionError(f"{what} did not start: {out[-2000:]}")
        time.sleep(0.05)


# --- HAProxy --------------------------------------------------------------------------------

class Haproxy:
    def __init__(self, p: subprocess.Popen, sock: Path):
        self.p, self.sock = p, sock

    def query(self, cmd: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.sock))
            s.sendall(cmd.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def accepted(self) -> list[int]:
        """`show activity`'s accepted connections, per thread (thread 1 first).
        Each call is itself one connection accepted by thread 1."""
        for line in self.query("show activity").splitlines():
            if line.startswith("accepted:"):
                return [int(x) for x in line.split("[", 1)[1].rstrip("] ").split()]
        raise AssertionError("HAProxy's show activity has no accepted line")


@contextmanager
def haproxy(port: int, tmp: Path, threads: int = 2) -> Iterator[Haproxy]:
    """HAProxy in the foreground, `nbthread threads`, one SO_REUSEPORT socket
    per thread (shards by-thread); yields once every thread has its socket in
    its epoll set."""
    if not os.access(HAPROXY, os.X_OK):
        pytest.skip("HAProxy is not installed (scripts/bootstrap installs it)")
    from reuseport_ctl.kernel import diag, owners
    sock = tmp / "haproxy.sock"
    conf = tmp / "haproxy.cfg"
    conf.write_text(HAPROXY_CONF.format(threads=threads, sock=sock, port=port))
    p = subprocess.Popen([HAPROXY, "-db", "-f", str(conf)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def up() -> bool:
        inodes = {s.inode for s in diag.listeners(port, "tcp")}
        waiting = owners.waiting_threads(p.pid)
        return len(inodes) == threads and sock.exists() and \
            sum(1 for w in waiting.values() if w & inodes) == threads
    try:
        _wait(p, up, "HAProxy")
        yield Haproxy(p, sock)
    finally:
        _stop(p, signal.SIGUSR1)            # soft stop


# --- a threaded server written here -----------------------------------------------------------

THREADED = r"""
import socket, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
ready = threading.Barrier(n + 1)
def serve():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(256)
    tid = threading.get_native_id()
    ready.wait()
    while True:
        c, _ = s.accept()
        with c:
            c.recv(4096)
            c.sendall(b"HTTP/1.1 200 OK\r\nX-Worker: %d\r\nContent-Length: 3\r\n"
                      b"Connection: close\r\n\r\nok\n" % tid)
for _ in range(n):
    threading.Thread(target=serve, daemon=True).start()
ready.wait()
print("ready", flush=True)
threading.Event().wait()
"""


@contextmanager
def threaded_server(port: int, threads: int) -> Iterator[subprocess.Popen]:
    """One Python process, `threads` threads, each with its own SO_REUSEPORT
    socket and a blocking accept(); each answers with X-Worker: its thread id."""
    p = subprocess.Popen([sys.executable, "-c", THREADED, str(port), str(threads)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert p.stdout.readline().strip() == b"ready"
        from reuseport_ctl.kernel import owners
        _wait(p, lambda: sum(1 for w in owners.waiting_threads(p.pid).values() if w)
              == threads, "the threaded server")
        yield p
    finally:
        _stop(p, signal.SIGKILL)


# --- dispatchers --------------------------------------------------------------------------------

DISPATCHER = r"""
import os, select, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
chans = []
for _ in range(n):                  # the children first: they never hold the listener
    a, b = socket.socketpair()
    if os.fork() == 0:
        a.close()
        for c in chans:
            c.close()
        held = {}
        ep = select.epoll()
        ep.register(b.fileno(), select.EPOLLIN)
        while True:
            for fd, _ in ep.poll():
                if fd == b.fileno():
                    _, fds, _, _ = socket.recv_fds(b, 1, 1)
                    c = socket.socket(fileno=fds[0])
                    held[c.fileno()] = c
                    ep.register(c.fileno(), select.EPOLLIN)
                    continue
                c = held[fd]
                if not c.recv(4096):
                    ep.unregister(fd)
                    held.pop(fd).close()
                    continue
                c.sendall(b"HTTP/1.1 200 OK\r\nX-Worker: %d\r\nContent-Length: 3\r\n\r\nok\n"
                          % os.getpid())
    b.close()
    chans.append(a)
s = socket.socket()
s.bind(("127.0.0.1", port))
s.listen(256)
print("ready", flush=True)
rr = 0
while True:
    c, _ = s.accept()
    socket.send_fds(chans[rr], [b"c"], [c.fileno()])
    c.close()                       # the child holds it now
    rr = (rr + 1) % n
"""

NODE_CLUSTER = r"""
const cluster = require('cluster');
const http = require('http');
const [port, n] = process.argv.slice(2).map(Number);
if (cluster.isPrimary) {
  let up = 0;
  for (let i = 0; i < n; i++) cluster.fork();
  cluster.on('listening', () => { if (++up === n) console.log('ready'); });
} else {
  const server = http.createServer((req, res) => {
    res.writeHead(200, {'X-Worker': String(process.pid), 'Content-Length': '3'});
    res.end('ok\n');
  });
  server.keepAliveTimeout = 120000;
  server.listen(port, '127.0.0.1');
}
"""


@contextmanager
def dispatcher(port: int, children: int, kind: str, tmp: Path) -> Iterator[subprocess.Popen]:
    """A server whose parent accepts and hands each connection to a child:
    kind "python" (written above, SCM_RIGHTS) or "node" (Node's cluster in
    its default scheduling, round-robin by the primary)."""
    if kind == "node":
        if not os.access(NODE, os.X_OK):
            pytest.skip(f"node is not installed ({NODE})")
        env = {k: v for k, v in os.environ.items() if k != "NODE_CLUSTER_SCHED_POLICY"}
        script = tmp / "cluster.js"         # cluster.fork() runs the primary's script file
        script.write_text(NODE_CLUSTER)
        cmd = [NODE, str(script), str(port), str(children)]
    else:
        env, cmd = None, [sys.executable, "-c", DISPATCHER, str(port), str(children)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                         start_new_session=True)
    try:
        line = p.stdout.readline().strip()
        assert line == b"ready", line
        _wait(p, lambda: _answers_keepalive(port), kind)
        yield p
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _answers_keepalive(port: int) -> bool:
    return _answers(port, keepalive=True)


def hold_connections(port: int, n: int) -> tuple[list[socket.socket], dict[int, int]]:
    """n keep-alive connections, one request each, kept open: the sockets and
    how many each server pid answered (its X-Worker header)."""
    socks, per = [], {}
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = b""
        while b"\r\n\r\nok\n" not in head:
            chunk = c.recv(4096)
            assert chunk, "the server closed a keep-alive connection"
            head += chunk
        pid = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                       if ln.lower().startswith(b"x-worker:")))
        per[pid] = per.get(pid, 0) + 1
        socks.append(c)
    return socks, per
