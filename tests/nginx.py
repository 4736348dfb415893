"""A real nginx for the tests: the distribution's package, started by the
test with N workers (reuseport unless told otherwise), each answering with header X-Worker: its pid."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import pytest

NGINX = "/usr/sbin/nginx"
CONF = """\
worker_processes {workers};
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 1024; }}
http {{
    {access_log}
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port}{reuseport};{extra}
        location / {{ add_header X-Worker $pid; return 200 "ok\\n"; }}
    }}
}}
"""


def answers(port: int, keepalive: bool = False) -> bool:
    """An HTTP server on 127.0.0.1:port says 200 (the tests' servers)."""
    import socket
    close = b"" if keepalive else b"Connection: close\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + close + b"\r\n")
            return c.recv(256).startswith(b"HTTP/1.1 200")
    except OSError:
        return False



@contextmanager
def nginx(port: int, tmp: Path, workers: int = 2, reuseport: bool = True,
          also: int | None = None, access_log: bool = False) -> Iterator[tuple[subprocess.Popen, list[int]]]:
    """nginx on 127.0.0.1:port (and 127.0.0.1:also) until the block ends;
    yields (master, worker pids) once every worker has its listener in epoll
    (each answered). Without reuseport the workers share the master's one
    listener. access_log: every request's worker pid, one line each, in
    tmp/access.log (access_log_pids() counts them): nginx's own ground truth."""
    if not os.access(NGINX, os.X_OK):
        pytest.skip("nginx is not installed (scripts/bootstrap installs nginx-light)")
    conf = tmp / "nginx.conf"
    rp = " reuseport" if reuseport else ""
    extra = f"\n        listen 127.0.0.1:{also}{rp};" if also else ""
    log = (f"log_format bypid '$pid';\n    access_log {tmp}/access.log bypid;" if access_log
           else "access_log off;")
    conf.write_text(CONF.format(tmp=tmp, port=port, workers=workers, reuseport=rp, extra=extra,
                                access_log=log))
    p = subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            kids = sorted(c.pid for c in psutil.Process(p.pid).children()) \
                if p.poll() is None else []
            if len(kids) == workers and answers(port) and _all_epolling(port, kids):
                break
            if p.poll() is not None or time.monotonic() > deadline:
                log = (tmp / "error.log").read_text() if (tmp / "error.log").exists() else ""
                raise AssertionError(f"nginx did not start: {log[-2000:]}")
            time.sleep(0.05)
        yield p, kids
    finally:
        p.send_signal(signal.SIGQUIT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _all_epolling(port: int, pids: list[int]) -> bool:
    """Each worker's epoll watches one of the port's listeners: it serves."""
    from reuseport_ctl.kernel import diag, owners
    inodes = {s.inode for s in diag.listeners(port, "tcp")}
    return all(owners.epoll_watched(pid) & inodes for pid in pids)


def access_log_pids(tmp: Path) -> dict[int, int]:
    """nginx's access log (nginx(access_log=True)): requests served per worker pid."""
    out: dict[int, int] = {}
    path = tmp / "access.log"
    for line in path.read_text().split() if path.exists() else ():
        out[int(line)] = out.get(int(line), 0) + 1
    return out


def respawned(master: int, old: list[int], port: int, timeout: float = 10.0) -> list[int]:
    """The master's workers once it has replaced a killed one (as many as
    before, each with the port's listener in its epoll)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            kids = sorted(c.pid for c in psutil.Process(master).children()
                          if c.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            kids = []
        if len(kids) == len(old) and kids != sorted(old) and _all_epolling(port, kids):
            return kids
        if time.monotonic() > deadline:
            raise AssertionError(f"nginx did not respawn a worker: {kids}")
        time.sleep(0.05)
