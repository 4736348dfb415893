"""What every benchmark script needs: its own network namespace, the
processes it starts (and stopping all of them, whatever happens), and
waiting until an HTTP server answers."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil

from reuseport_ctl.errors import UserError
from reuseport_ctl.kernel.netns import enter_private_netns


def private_netns(script: str) -> str:
    """Move this process into a fresh network namespace (loopback only)
    before anything is started; returns a line saying so."""
    if os.geteuid() != 0:
        sys.exit(f"{script}: needs root (network namespace, BPF).")
    try:
        enter_private_netns()
    except UserError as e:
        sys.exit(f"{script}: {e}")
    return f"netns inode {os.stat('/proc/self/ns/net').st_ino} (private; links: lo)"


NGINX = shutil.which("nginx", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")) \
    or "/usr/sbin/nginx"
NGINX_CONF = """\
worker_processes {workers};
worker_cpu_affinity auto;
daemon off;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=1024;
        location / {{ add_header X-Worker $pid; return 200 "ok\\n"; }}
    }}
}}
"""

_started: list[subprocess.Popen] = []


def spawn(argv: list[str], **kw) -> subprocess.Popen:
    p = subprocess.Popen(argv, **kw)
    _started.append(p)
    return p


def stop(p: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Stop one process we started, and (by pid) whatever it left behind."""
    if p.poll() is None:
        try:
            kids = psutil.Process(p.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        try:
            p.send_signal(sig)
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        except ProcessLookupError:
            pass
        for k in kids:
            try:
                if k.is_running():
                    k.kill()
            except psutil.Error:
                pass
    if p in _started:
        _started.remove(p)


def stop_all(nginx: str = "") -> None:
    """Everything we started, newest first (nginx by SIGQUIT, its graceful
    stop), then anything still below us by pid."""
    for p in list(reversed(_started)):
        stop(p, signal.SIGQUIT if nginx and p.args[0] == nginx else signal.SIGTERM)
    for k in psutil.Process().children(recursive=True):
        try:
            k.kill()
        except psutil.Error:
            pass


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C does, so every finally: block runs."""
    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)


def wait_http(port: int, proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    """Until 127.0.0.1:port answers a GET with 200 (or proc dies; None: a
    server that daemonized)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} not answering within {timeout:.0f} s")


def start_nginx(port: int, workers: int, tmp: str) -> subprocess.Popen:
    """nginx on 127.0.0.1:port, `workers` workers (`reuseport`, each pinned
    by worker_cpu_affinity auto), its files in tmp; returns once it answers.
    Stop it with stop(p, signal.SIGQUIT), or stop_all(NGINX)."""
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(workers=workers, tmp=tmp, port=port))
    p = spawn([NGINX, "-p", tmp, "-c", conf, "-e", os.path.join(tmp, "error.log")],
              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_http(port, p)
    return p
