#!/usr/bin/env python3
"""Real servers reloaded under load: what the client loses, per server and
way of reloading, with net.ipv4.tcp_migrate_req 0 and 1.

Each server runs in this script's own network namespace; `reuseport-ctl
reload --exec` 's engine (experiments/reload.run_external) puts a steady
load on it (TCP short connections and keep-alive connections) while the
server's own reload command runs N times, and counts every failure the
client sees; sock_diag says whether the server kept its sockets or bound
new ones.

    sudo .venv/bin/python benchmarks/reload_servers.py --json docs/reload-servers.json
    sudo .venv/bin/python benchmarks/reload_servers.py --only haproxy-sf,gunicorn

Servers and reloads:
    nginx-hup        nginx reuseport, 2 workers; `nginx -s reload` (SIGHUP)
    nginx-usr2       the same; binary upgrade: USR2, then QUIT to the old master
    haproxy-sf       HAProxy 2.6, nbthread 2, `shards by-thread` (2 sockets);
                     a new `haproxy -D -sf OLD`: new sockets, the old close
    haproxy-sf-x     the same with `expose-fd listeners` and `-x SOCK`: the
                     new process takes the old sockets
    haproxy-W        master-worker (-W -S master socket), USR2 to the master
    gunicorn         gunicorn --reuse-port, 2 gthread workers; SIGHUP
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from reuseport_ctl.experiments import reload as rl  # noqa: E402

PORT = 8080
HAPROXY = "/usr/sbin/haproxy"
HAPROXY_CONF = """\
global
    nbthread 2
    stats socket {tmp}/haproxy.sock mode 600 level admin{expose}
defaults
    mode http
    timeout client 10s
    timeout server 10s
    timeout connect 10s
frontend fe
    bind 127.0.0.1:{port} shards by-thread
    http-request return status 200 content-type text/plain string "ok"
"""
WSGI = """\
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\\n"]
"""


class Daemons:
    """Processes that daemonize (HAProxy -D, nginx's new master): every pid
    ever read from their pid file, so that each one is stopped at the end."""

    def __init__(self, pidfile: Path):
        self.pidfile, self.pids = pidfile, set()

    def note(self) -> None:
        import psutil
        for f in (self.pidfile, self.pidfile.with_name(self.pidfile.name + ".oldbin")):
            try:
                self.pids.update(int(x) for x in f.read_text().split())
            except (OSError, ValueError):
                pass
        for pid in list(self.pids):         # and their workers
            try:
                self.pids.update(c.pid for c in psutil.Process(pid).children())
            except psutil.Error:
                pass

    def stop(self, first: int = signal.SIGTERM) -> None:
        self.note()
        for sig in (first, signal.SIGKILL):
            for pid in self.pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(1.0 if sig == first else 0)


def server(name: str, tmp: Path):
    """Start `name`; returns (reload command, stop function)."""
    t = str(tmp)
    if name == "nginx-hup":
        p = harness.start_nginx(PORT, 2, t)
        return f"kill -HUP {p.pid}", lambda: harness.stop(p, signal.SIGQUIT), None
    if name == "nginx-usr2":
        # binary upgrade (daemon on: the new master outlives the old one): a new
        # master, exec'ed by the old one, inherits the sockets; then QUIT the old
        conf = tmp / "nginx.conf"
        conf.write_text(harness.NGINX_CONF.format(workers=2, tmp=t, port=PORT)
                        .replace("daemon off;", "daemon on;"))
        harness.subprocess.run([harness.NGINX, "-p", t, "-c", str(conf), "-e",
                                f"{t}/error.log"], check=True)
        daemons = Daemons(tmp / "nginx.pid")
        harness.wait_http(PORT, None)
        daemons.note()
        cmd = (f"cd {t}; old=$(cat nginx.pid); kill -USR2 $old; "
               f"for i in $(seq 100); do [ -s nginx.pid.oldbin ] && [ -s nginx.pid ] && break; "
               f"sleep 0.02; done; sleep 0.3; kill -QUIT $old")
        return cmd, lambda: daemons.stop(signal.SIGQUIT), daemons
    if name.startswith("haproxy"):
        expose = name == "haproxy-sf-x"
        conf = tmp / "haproxy.cfg"
        conf.write_text(HAPROXY_CONF.format(tmp=t, port=PORT,
                                            expose=" expose-fd listeners" if expose else ""))
        pidf = tmp / "haproxy.pid"
        daemons = Daemons(pidf)
        if name == "haproxy-W":
            p = harness.spawn([HAPROXY, "-W", "-S", f"{t}/master.sock", "-f", str(conf),
                               "-p", str(pidf)], stdout=harness.subprocess.DEVNULL,
                              stderr=harness.subprocess.DEVNULL)
            harness.wait_http(PORT, p)
            cmd = f"kill -USR2 {p.pid}"

            def stop():
                daemons.note()
                harness.stop(p, signal.SIGTERM)
                daemons.stop()
            return cmd, stop, daemons
        start = [HAPROXY, "-D", "-p", str(pidf), "-f", str(conf)]
        harness.subprocess.run(start, check=True)
        harness.wait_http(PORT, None)
        daemons.note()
        x = f" -x {t}/haproxy.sock" if expose else ""
        cmd = f"{HAPROXY} -D -p {pidf} -f {conf}{x} -sf $(cat {pidf})"
        return cmd, daemons.stop, daemons
    if name == "gunicorn":
        (tmp / "app.py").write_text(WSGI)
        gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
        p = harness.spawn([gunicorn, "--reuse-port", "-w", "2", "-k", "gthread", "--threads",
                           "4", "-b", f"127.0.0.1:{PORT}", "--chdir", t, "--log-level",
                           "warning", "--graceful-timeout", "5", "app:app"],
                          stdout=harness.subprocess.DEVNULL, stderr=harness.subprocess.DEVNULL)
        harness.wait_http(PORT, p)
        time.sleep(0.5)                 # both workers booted
        return f"kill -HUP {p.pid}", lambda: harness.stop(p, signal.SIGTERM), None
    raise SystemExit(f"unknown server {name}")


SERVERS = ("nginx-hup", "nginx-usr2", "haproxy-sf", "haproxy-sf-x", "haproxy-W", "gunicorn")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(SERVERS))
    ap.add_argument("--reloads", type=int, default=5)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--migrate-req", default="0,1")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--plot", default=None, help="write a PNG here")
    ap.add_argument("--plot-from", default=None, help="only plot this --json file")
    args = ap.parse_args()
    if args.plot_from:
        from reuseport_ctl.ui.reload_plot import write_servers_plot
        write_servers_plot(json.loads(Path(args.plot_from).read_text()), args.plot)
        return 0
    print(harness.private_netns("reload_servers.py"), file=sys.stderr)
    harness.exit_on_sigterm()
    rows = []
    try:
        for name in args.only.split(","):
            for mig in (int(m) for m in args.migrate_req.split(",")):
                with tempfile.TemporaryDirectory(prefix="rpctl-reload-") as tmp:
                    cmd, stop, daemons = server(name, Path(tmp))
                    try:
                        cfg = rl.ExternalConfig(port=PORT, command=cmd, reloads=args.reloads,
                                                duration=args.duration,
                                                loads=("short", "keepalive"), migrate_req=mig)
                        rep = rl.run_external(cfg, tick=lambda *a: daemons and daemons.note())
                    finally:
                        stop()
                for r in rep["runs"]:
                    row = {"server": name, "migrate_req": mig, "load": r["load"],
                           "conns": r["conns"], "errors": r["errors"],
                           "failed_per_10k": r["failed_per_10k"],
                           "failed_new": r["failed_new"], "failed_reused": r["failed_reused"],
                           "failed_new_per_10k": r["failed_new_per_10k"],
                           "reset_per_10k": r["reset_per_10k"], "sockets": r["sockets"],
                           "command_failed": r["command_failed"],
                           "stderr": sorted({e["stderr"] for e in r["events"] if e["stderr"]})}
                    rows.append(row)
                    print(f"{name:13} mig={mig} {r['load']:9} {r['conns']:7,} conns  "
                          f"failed/10k {r['failed_per_10k']:7.2f} (new conns "
                          f"{r['failed_new_per_10k']:.2f})  {r['errors']}  "
                          f"sockets {r['sockets']}", flush=True)
                if rep["interrupted"]:
                    return 128 + rep["interrupted"]
    finally:
        harness.stop_all(harness.NGINX)
    rep = {"kernel": os.uname().release, "cpus": os.cpu_count(), "reloads": args.reloads,
           "duration_s": args.duration, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))
    if args.plot:
        from reuseport_ctl.ui.reload_plot import write_servers_plot
        write_servers_plot(rep, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
