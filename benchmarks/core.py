#!/usr/bin/env python3
"""The core benchmarks of reuseport-ctl, side by side in one run, as ratios.

    .venv/bin/python benchmarks/core.py [--quick] [--json FILE] [--rounds N] [--seconds S]

Three comparisons, each measured interleaved (A, B, A, B, ... for several
rounds) so that drift hits both sides alike; each side is reported as the
median and min-max of its rounds, and the figure is the ratio of medians.

  1. eBPF selector vs the kernel's default: `reuseport-ctl run` (reuseport
     model, 2 workers) with --policy hash / round-robin vs --policy kernel,
     same client (wrk -t2 -c32, short connections).      goal >= 0.98
  2. built-in client (`reuseport-ctl load`, 2 processes, concurrency 32) vs
     wrk -t2 -c32, against the same nginx (2 workers, reuseport): short
     connections and keep-alive.                          goal >= 1.0
  3. `reuseport-ctl run` workers vs nginx, 2 workers each, same client
     (wrk -t2 -c32): short connections and keep-alive.   goal >= 0.9

While every measurement runs, psutil samples the CPU time of every process
involved (client processes and wrk's threads, server workers, nginx
workers, this harness) and of each CPU; a process (or wrk thread) at >= 90 %
of one core over the run is what limited the figure.

Only loopback traffic, inside a private network namespace that the script
enters before it starts anything (harness.private_netns). Everything it starts (servers, clients) is stopped on exit,
on Ctrl-C, on SIGTERM and on errors.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil
from rich.console import Console
from rich.table import Table

import harness
from harness import NGINX, exit_on_sigterm, private_netns, spawn, stop, stop_all, wait_http

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
VENV_BIN = Path(sys.executable).parent
RPCTL = shutil.which("reuseport-ctl", path=str(VENV_BIN)) or str(VENV_BIN / "reuseport-ctl")
WRK = shutil.which("wrk") or "/usr/bin/wrk"
SATURATED = 90.0            # % of one core
DISTURBED = 20.0            # other processes' CPU (% of one core) that voids a sample
ATTEMPTS = 3                # measurements of one sample before a disturbed one is kept
TICK_S = 0.2                # CPU sampling period
CONC = 32                   # connections in flight, every client
THREADS = 2                 # wrk -t2; the built-in client gets as many processes
KEEPALIVE_RPC = 100         # built-in client: requests per keep-alive connection
WORKERS = 2

PORT_RUN = {"kernel": 18080, "hash": 18081, "round-robin": 18082}
PORT_NGINX = 18090

console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)


# --- network namespace ----------------------------------------------------------

# --- servers ------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen
    kind: str                   # "run" or "nginx"
    tmp: Optional[str] = None

    def root(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)


def start_run(policy: str, logdir: str) -> Server:
    port = PORT_RUN[policy]
    log = open(os.path.join(logdir, f"run-{policy}.log"), "wb")
    p = spawn([RPCTL, "run", "--workers", str(WORKERS), "--port", str(port), "--policy", policy],
              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    srv = Server(f"run/{policy}", port, p, "run")
    wait_http(port, p)
    return srv


def start_nginx() -> Server:
    tmp = tempfile.mkdtemp(prefix="rpctl-bench-nginx-")
    return Server("nginx", PORT_NGINX, harness.start_nginx(PORT_NGINX, WORKERS, tmp), "nginx",
                  tmp)


# --- CPU sampling -------------------------------------------------------------------

def _proc_times(root: psutil.Process, threads: bool) -> dict:
    out = {}
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return out
    for p in procs:
        try:
            with p.oneshot():
                t = p.cpu_times()
                out[(p.pid, None)] = (p.name(), p.pid == root.pid, t.user + t.system)
                if threads:
                    for th in p.threads():
                        out[(p.pid, th.id)] = (p.name(), th.id == p.pid,
                                               th.user_time + th.system_time)
        except psutil.Error:
            pass
    return out


_HZ = os.sysconf("SC_CLK_TCK")


def _all_times() -> dict:
    """pid -> (comm, user+system seconds) for every process on the machine:
    straight from /proc/PID/stat, cheap enough for every tick."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        lp, rp = data.find(b"("), data.rfind(b")")
        rest = data[rp + 2:].split()
        out[int(name)] = (data[lp + 1:rp].decode(errors="replace"),
                          (int(rest[11]) + int(rest[12])) / _HZ)
    return out


@dataclass
class Tick:
    t: float
    active: bool
    procs: dict                 # role -> {(pid, tid): (name, is_root/main, cpu seconds)}
    cpus: list
    everyone: dict              # pid -> (comm, cpu seconds), every process


def sample(roles: dict[str, tuple[psutil.Process, bool]], active: bool) -> Tick:
    return Tick(time.monotonic(), active,
                {r: _proc_times(p, th) for r, (p, th) in roles.items()},
                psutil.cpu_times(percpu=True), _all_times())


def _numbered(entries: list, threads: bool, worker: str, leader: str) -> dict:
    """The leader (v[1]) by name and its workers numbered: its threads
    (k[1] is a tid) or its processes."""
    mine = [(k, v) for k, v in entries if (k[1] is not None) == threads]
    names = {k: f"{worker} {i + 1}" for i, k in enumerate(sorted(k for k, v in mine if not v[1]))}
    names.update({k: leader for k, v in mine if v[1]})
    return names


def _label(role: str, kind: str, entries: list) -> dict:
    """Stable names across rounds: (pid, tid) -> label."""
    names = {}
    if kind == "wrk":
        names = _numbered(entries, True, "wrk thread", "wrk main thread")
    elif kind == "load":
        names = _numbered(entries, False, "load process", "load parent")
    elif kind == "run":
        for k, v in entries:
            if k[1] is None:
                names[k] = "run supervisor" if v[1] else f"run {v[0].replace('rpctl-', '')}"
    elif kind == "nginx":
        names = _numbered(entries, False, "nginx worker", "nginx master")
    elif kind == "harness":
        for k, v in entries:
            if k[1] is None and v[1]:
                names[k] = "bench harness"
    return names


def cpu_usage(ticks: list[Tick], kinds: dict[str, str]) -> tuple[dict, dict]:
    """Per labelled process/thread: % of one core over the client's active
    window; and per CPU: busy % and softirq %."""
    win = [t for t in ticks if t.active]
    if len(win) < 2:
        win = ticks
    if len(win) < 2:
        return {}, {}, ""
    first, last = win[0], win[-1]
    usage = {}
    for role, kind in kinds.items():
        entries = {}
        for t in win:
            for k, v in t.procs.get(role, {}).items():
                entries.setdefault(k, []).append((t.t, v))
        names = _label(role, kind, [(k, v[0][1]) for k, v in entries.items()])
        for k, seq in entries.items():
            if k not in names or len(seq) < 2:
                continue
            dt = seq[-1][0] - seq[0][0]
            if dt < 0.3:
                continue
            usage[names[k]] = round(100.0 * (seq[-1][1][2] - seq[0][1][2]) / dt, 1)
    # Everything else on the machine over the same window: other tenants
    # (a test suite running beside us), and ksoftirqd (our own softirq work
    # deferred to a thread) kept apart.
    ours = {pid for t in win for procs in t.procs.values() for pid, _ in procs}
    dt = last.t - first.t
    other, ksoft, names = 0.0, 0.0, {}
    for pid, (comm, c1) in last.everyone.items():
        if pid in ours or pid not in first.everyone or first.everyone[pid][0] != comm:
            continue
        d = 100.0 * (c1 - first.everyone[pid][1]) / dt
        if comm.startswith("ksoftirqd"):
            ksoft += d
        elif d > 0:
            other += d
            names[comm] = names.get(comm, 0.0) + d
    usage["other processes"] = round(other, 1)
    usage["ksoftirqd"] = round(ksoft, 1)
    top = sorted(names.items(), key=lambda kv: -kv[1])[:3]
    others_top = ", ".join(f"{k} {v:.0f}%" for k, v in top if v >= 1)
    cpus = {}
    for i, (a, b) in enumerate(zip(first.cpus, last.cpus)):
        tot = sum(b) - sum(a)
        if tot <= 0:
            continue
        idle = (b.idle - a.idle) + (getattr(b, "iowait", 0) - getattr(a, "iowait", 0))
        cpus[f"cpu{i}"] = {"busy": round(100 * (1 - idle / tot), 1),
                           "softirq": round(100 * (b.softirq - a.softirq) / tot, 1),
                           "system": round(100 * (b.system - a.system) / tot, 1),
                           "user": round(100 * (b.user - a.user) / tot, 1),
                           "steal": round(100 * (b.steal - a.steal) / tot, 1)}
    # Busy CPU time that none of our processes (nor ksoftirqd, nor a process
    # alive at both ends of the window) accounts for: short-lived processes
    # of other tenants, mostly. The tick-based accounting of this kernel
    # charges softirq time to whichever task was running, so for a quiet
    # machine this is a few %.
    if cpus:
        busy = sum(c["busy"] for c in cpus.values())
        mine = sum(v for k, v in usage.items() if k != "other processes")
        usage["unaccounted"] = round(max(0.0, busy - mine - other), 1)
    return usage, cpus, others_top


# --- clients ---------------------------------------------------------------------------

@dataclass
class Sample:
    config: str
    round: int
    client: str
    server: str
    mode: str                   # "short" or "keepalive"
    rate: float                 # connections/s (short) or requests/s (keep-alive)
    unit: str
    seconds: float
    errors: dict
    cpu: dict
    cpus: dict
    raw: object = None
    others_top: str = ""        # the busiest processes that are not ours
    disturbed: bool = False     # other processes took >= DISTURBED % of a core
    used: bool = True           # counted in the medians (the last attempt of its round)


def _measure(argv: list[str], kind: str, server: Server, limit_s: float) -> tuple:
    """Run a client to its end, sampling CPU; returns (stdout, usage, cpus, wall)."""
    out_f = tempfile.TemporaryFile()
    t0 = time.monotonic()
    p = spawn(argv, stdout=out_f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        client = psutil.Process(p.pid)
        roles = {"client": (client, kind == "wrk"), "server": (server.root(), False),
                 "harness": (psutil.Process(), False)}
        kinds = {"client": kind, "server": server.kind, "harness": "harness"}
        ticks = []
        time.sleep(0.25 if kind == "wrk" else 0.05)
        while p.poll() is None:
            if time.monotonic() - t0 > limit_s:
                raise RuntimeError(f"client {' '.join(argv)} ran over {limit_s:.0f} s")
            if kind == "wrk":
                active = True
            else:       # the load processes are forked once the CLI is up
                try:
                    active = bool(client.children())
                except psutil.Error:
                    active = False
            tk = sample(roles, active)
            if p.poll() is not None:        # ended during the sample: it is partial
                break
            ticks.append(tk)
            time.sleep(TICK_S)
        p.wait()
        wall = time.monotonic() - t0
    finally:
        stop(p)
    out_f.seek(0)
    text = out_f.read().decode(errors="replace")
    out_f.close()
    if kind == "wrk" and ticks:
        ticks = ticks[:-1] if len(ticks) > 3 else ticks     # the last tick may be past the end
    usage, cpus, others = cpu_usage(ticks, kinds)
    return text, usage, cpus, others, wall, p.returncode


_UNIT = {"k": 1e3, "M": 1e6, "G": 1e9}


def run_wrk(server: Server, mode: str, seconds: float, config: str, rnd: int) -> Sample:
    argv = [WRK, f"-t{THREADS}", f"-c{CONC}", f"-d{seconds:g}s", "--timeout", "2s"]
    if mode == "short":
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{server.port}/")
    text, usage, cpus, others, wall, rc = _measure(argv, "wrk", server, seconds * 3 + 15)
    m = re.search(r"Requests/sec:\s*([\d.]+)", text)
    if rc != 0 or not m:
        raise RuntimeError(f"wrk failed (exit {rc}):\n{text}")
    errors = {}
    m2 = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m2:
        errors = dict(zip(("connect", "read", "write", "timeout"), map(int, m2.groups())))
    m3 = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m3:
        errors["non2xx"] = int(m3.group(1))
    m4 = re.search(r"(\d+) requests in ([\d.]+)(\w+),", text)
    secs = seconds
    if m4:
        secs = float(m4.group(2)) * {"s": 1, "ms": 1e-3, "us": 1e-6, "m": 60}.get(m4.group(3), 1)
    return Sample(config, rnd, "wrk -t2", server.name, mode, float(m.group(1)),
                  "conn/s" if mode == "short" else "req/s", round(secs, 3), errors, usage, cpus,
                  raw=text, others_top=others)


def run_builtin(server: Server, mode: str, seconds: float, config: str, rnd: int,
                guess: dict) -> Sample:
    """`reuseport-ctl load` sized from the last rate seen so that it runs ~seconds."""
    rpc = 1 if mode == "short" else KEEPALIVE_RPC
    key = (server.name, mode)
    conns = max(CONC * 4, int(guess.get(key, 5000.0) * seconds / rpc))
    argv = [RPCTL, "load", "--port", str(server.port), "--conns", str(conns),
            "--concurrency", str(CONC), "--processes", str(THREADS),
            "--requests-per-conn", str(rpc), "--json"]
    text, usage, cpus, others, wall, rc = _measure(argv, "load", server, seconds * 5 + 30)
    try:
        res = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"reuseport-ctl load failed (exit {rc}):\n{text}") from None
    # LoadResult.rate counts connections; a keep-alive connection carried rpc requests.
    rate = res["ok"] * rpc / res["elapsed_s"] if res["elapsed_s"] else 0.0
    guess[key] = rate
    errors = {k: v for k, v in res["errors"].items() if v}
    return Sample(config, rnd, "built-in", server.name, mode, round(rate, 1),
                  "conn/s" if mode == "short" else "req/s", res["elapsed_s"], errors, usage,
                  cpus, raw={k: res[k] for k in ("conns", "ok", "errors", "elapsed_s", "rate",
                                                 "latency_ms", "per_worker")}, others_top=others)


# --- the plan ---------------------------------------------------------------------------

@dataclass
class Config:
    key: str
    label: str
    client: str                 # "wrk" or "builtin"
    server: str                 # key into servers
    mode: str


@dataclass
class Comparison:
    name: str
    a: str                      # config keys: ratio = a / b
    b: str
    goal: float
    unit: str


CONFIGS = {c.key: c for c in [
    Config("sel-kernel", "run kernel · wrk short", "wrk", "run/kernel", "short"),
    Config("sel-hash", "run hash · wrk short", "wrk", "run/hash", "short"),
    Config("sel-rr", "run round-robin · wrk short", "wrk", "run/round-robin", "short"),
    Config("cli-ours-short", "built-in → nginx short", "builtin", "nginx", "short"),
    Config("cli-wrk-short", "wrk → nginx short", "wrk", "nginx", "short"),
    Config("cli-ours-ka", "built-in → nginx keep-alive", "builtin", "nginx", "keepalive"),
    Config("cli-wrk-ka", "wrk → nginx keep-alive", "wrk", "nginx", "keepalive"),
    Config("srv-run-short", "wrk → run short", "wrk", "run/kernel", "short"),
    Config("srv-nginx-short", "wrk → nginx short", "wrk", "nginx", "short"),
    Config("srv-run-ka", "wrk → run keep-alive", "wrk", "run/kernel", "keepalive"),
    Config("srv-nginx-ka", "wrk → nginx keep-alive", "wrk", "nginx", "keepalive"),
]}

GROUPS = [  # each group is measured interleaved, round by round
    ["sel-kernel", "sel-hash", "sel-rr"],
    ["cli-ours-short", "cli-wrk-short", "cli-ours-ka", "cli-wrk-ka"],
    ["srv-run-short", "srv-nginx-short", "srv-run-ka", "srv-nginx-ka"],
]

COMPARISONS = [
    Comparison("eBPF selector hash ÷ kernel default (run, 2 workers, wrk -t2 short conns)",
               "sel-hash", "sel-kernel", 0.98, "conn/s"),
    Comparison("eBPF selector round-robin ÷ kernel default (same)",
               "sel-rr", "sel-kernel", 0.98, "conn/s"),
    Comparison("built-in client ÷ wrk -t2 → nginx, short conns",
               "cli-ours-short", "cli-wrk-short", 1.0, "conn/s"),
    Comparison("built-in client ÷ wrk -t2 → nginx, keep-alive",
               "cli-ours-ka", "cli-wrk-ka", 1.0, "req/s"),
    Comparison("run workers ÷ nginx (2 workers each, wrk -t2), short conns",
               "srv-run-short", "srv-nginx-short", 0.9, "conn/s"),
    Comparison("run workers ÷ nginx (2 workers each, wrk -t2), keep-alive",
               "srv-run-ka", "srv-nginx-ka", 0.9, "req/s"),
]


def measure(cfg: Config, servers: dict, seconds: float, rnd: int, guess: dict) -> Sample:
    srv = servers[cfg.server]
    if cfg.client == "wrk":
        return run_wrk(srv, cfg.mode, seconds, cfg.key, rnd)
    return run_builtin(srv, cfg.mode, seconds, cfg.key, rnd, guess)


# --- summarising -------------------------------------------------------------------------

def med(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt_rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def side(samples: list[Sample]) -> str:
    r = [s.rate for s in samples]
    return f"{fmt_rate(med(r))} [{fmt_rate(min(r))}–{fmt_rate(max(r))}]"


def cpu_median(samples: list[Sample]) -> dict:
    labels = sorted({k for s in samples for k in s.cpu})
    return {k: round(med([s.cpu[k] for s in samples if k in s.cpu]), 1) for k in labels}


def machine_busy(samples: list[Sample]) -> float:
    per = [statistics.mean(c["busy"] for c in s.cpus.values()) for s in samples if s.cpus]
    return round(med(per), 1) if per else float("nan")


def softirq(samples: list[Sample]) -> float:
    per = [statistics.mean(c["softirq"] for c in s.cpus.values()) for s in samples if s.cpus]
    return round(med(per), 1) if per else float("nan")


def role_cpu(samples: list[Sample]) -> dict:
    """% of one core, medians over rounds: all client processes/threads, all
    server processes, and the kernel's softirq time (not charged to any
    process: on loopback most of the TCP receive path runs there)."""
    cpu = cpu_median(samples)
    client = sum(v for k, v in cpu.items() if k.startswith(("wrk", "load")))
    server = sum(v for k, v in cpu.items() if k.startswith(("run", "nginx")))
    ncpu = max((len(s.cpus) for s in samples), default=0)
    return {"client": round(client), "server": round(server),
            "other": round(cpu.get("other processes", 0.0) + cpu.get("unaccounted", 0.0)),
            "softirq": round(softirq(samples) * ncpu), "busy": machine_busy(samples)}


def limited_by(samples: list[Sample]) -> str:
    cpu = cpu_median(samples)
    sat = [(k, v) for k, v in cpu.items()
           if v >= SATURATED and k not in ("wrk main thread", "other processes", "unaccounted")]
    r = role_cpu(samples)
    split = (f"CPUs {r['busy']:.0f}% busy: client {r['client']}%, server {r['server']}%, "
             f"not ours {r['other']}% (softirq {r['softirq']}%, mostly inside those)")
    if sat:
        return "saturated: " + ", ".join(f"{k} {v:.0f}%" for k, v in sat) + f"; {split}"
    return f"no process ≥90%; {split}"


def summarize(samples: list[Sample]) -> list[dict]:
    by = {}
    for s in [s for s in samples if s.used]:
        by.setdefault(s.config, []).append(s)
    rows = []
    for c in COMPARISONS:
        a, b = by.get(c.a, []), by.get(c.b, [])
        if not a or not b:
            continue
        ratio = med([s.rate for s in a]) / med([s.rate for s in b])
        rounds = sorted({s.round for s in a} & {s.round for s in b})
        paired = [next(s.rate for s in a if s.round == r) / next(s.rate for s in b if s.round == r)
                  for r in rounds]
        met = "yes" if ratio >= c.goal else (
            "no (within noise)" if paired and max(paired) >= c.goal else "no")
        rows.append({"comparison": c.name, "unit": c.unit, "a": c.a, "b": c.b,
                     "a_label": CONFIGS[c.a].label, "b_label": CONFIGS[c.b].label,
                     "a_median": med([s.rate for s in a]), "b_median": med([s.rate for s in b]),
                     "a_text": side(a), "b_text": side(b), "ratio": round(ratio, 3),
                     "paired_ratios": [round(x, 3) for x in paired], "goal": c.goal, "met": met,
                     "limited_a": limited_by(a), "limited_b": limited_by(b),
                     "cpu_a": cpu_median(a), "cpu_b": cpu_median(b),
                     "errors_a": sum(sum(s.errors.values()) for s in a),
                     "errors_b": sum(sum(s.errors.values()) for s in b)})
    return rows


def print_tables(rows: list[dict], samples: list[Sample], header: str) -> None:
    console.print(header)
    t = Table(title="reuseport-ctl core benchmarks: ratio of medians (A ÷ B)", show_lines=True)
    for col in ("comparison", "A: median [min–max]", "B: median [min–max]", "ratio",
                "goal", "met?", "limited by (A | B)"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r["comparison"], f"{r['a_text']} {r['unit']}", f"{r['b_text']} {r['unit']}",
                  f"{r['ratio']:.3f}", f"≥ {r['goal']:g}",
                  ("[green]" if r["met"] == "yes" else "[red]") + r["met"],
                  f"A: {r['limited_a']}\nB: {r['limited_b']}")
    console.print(t)
    d = Table(title="every configuration: rate per round; CPU in % of one core (medians "
                    "over rounds); rate per core-second spent by the client / by the server")
    for col in ("config", "rates per round", "errors", "CPU per process", "client", "server",
                "not ours", "softirq", "CPUs busy", "rate / client core",
                "rate / server core", "redone"):
        d.add_column(col, overflow="fold")
    by = {}
    for s in [s for s in samples if s.used]:
        by.setdefault(s.config, []).append(s)
    for key, ss in by.items():
        cpu = cpu_median(ss)
        errs = {}
        for s in ss:
            for k, v in s.errors.items():
                errs[k] = errs.get(k, 0) + v
        r = role_cpu(ss)
        rate = med([s.rate for s in ss])
        d.add_row(CONFIGS[key].label, " ".join(fmt_rate(s.rate) for s in ss),
                  ", ".join(f"{k} {v}" for k, v in errs.items()) or "0",
                  ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()
                            if k not in ("other processes", "unaccounted") and (v >= 1 or not k.endswith(
                                ("master", "supervisor", "parent", "main thread")))),
                  f"{r['client']}%", f"{r['server']}%", f"{r['other']}%", f"{r['softirq']}%",
                  f"{r['busy']:.0f}%",
                  fmt_rate(100 * rate / r["client"]) if r["client"] else "-",
                  fmt_rate(100 * rate / r["server"]) if r["server"] else "-",
                  str(sum(1 for s in samples if s.config == key and not s.used)))
    console.print(d)
    console.print("limited by, per comparison (medians over rounds; a process or wrk thread "
                  f"at ≥ {SATURATED:.0f}% of one core counts as saturated):")
    for r in rows:
        console.print(f"  {r['comparison']}\n    A {r['a_label']}: {r['limited_a']}\n"
                      f"    B {r['b_label']}: {r['limited_b']}")


# --- main ----------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 2 s (about 1.5 minutes)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per configuration [5]")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per measurement, whole [3]")
    ap.add_argument("--json", metavar="FILE", help="write every raw sample here")
    ap.add_argument("--only", choices=["selector", "client", "server"], action="append",
                    help="run only these comparisons (repeatable)")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    seconds = max(1, round(args.seconds or (2 if args.quick else 3)))   # wrk takes whole seconds
    if not os.path.exists(WRK) or not os.path.exists(NGINX):
        sys.exit(f"benchmarks/core.py: needs wrk ({WRK}) and nginx ({NGINX}).")

    where = private_netns("core.py")
    exit_on_sigterm()
    command = "benchmarks/core.py " + " ".join(sys.argv[1:])
    env = {"kernel": platform.release(), "cpus": os.cpu_count(),
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": f".venv/bin/python {command}".strip(), "netns": where,
           "rounds": rounds, "seconds": seconds, "concurrency": CONC, "workers": WORKERS,
           "wrk": subprocess.run([WRK, "--version"], capture_output=True, text=True)
           .stdout.splitlines()[0] if os.path.exists(WRK) else None,
           "nginx": subprocess.run([NGINX, "-v"], capture_output=True, text=True)
           .stderr.strip()}
    header = (f"[bold]reuseport-ctl core benchmarks[/] · kernel {env['kernel']} · "
              f"{env['cpus']} CPUs · {env['date']}\n{env['command']} · {rounds} rounds × "
              f"{seconds:g} s, interleaved · client concurrency {CONC}, 2 threads/processes · "
              f"{where}")
    err.print(header)
    groups = GROUPS
    if args.only:
        pick = {"selector": 0, "client": 1, "server": 2}
        groups = [GROUPS[pick[o]] for o in dict.fromkeys(args.only)]
    need = {CONFIGS[k].server for g in groups for k in g}
    samples: list[Sample] = []
    logdir = tempfile.mkdtemp(prefix="rpctl-bench-")
    servers: dict[str, Server] = {}
    try:
        for name in sorted(need):
            if name == "nginx":
                servers[name] = start_nginx()
            else:
                servers[name] = start_run(name.split("/", 1)[1], logdir)
            err.print(f"  started {name} on 127.0.0.1:{servers[name].port} "
                      f"(pid {servers[name].proc.pid})")
        guess: dict = {}
        for g in groups:
            err.print(f"[bold]warm-up[/] {', '.join(CONFIGS[k].label for k in g)}")
            for k in g:
                measure(CONFIGS[k], servers, 1.0, -1, guess)
            for rnd in range(rounds):
                for k in (g if rnd % 2 == 0 else list(reversed(g))):
                    for attempt in range(ATTEMPTS):
                        s = measure(CONFIGS[k], servers, seconds, rnd, guess)
                        oth = s.cpu.get("other processes", 0.0) + s.cpu.get("unaccounted", 0.0)
                        s.disturbed = oth >= DISTURBED
                        s.used = not s.disturbed or attempt == ATTEMPTS - 1
                        samples.append(s)
                        note = (f"  [yellow]disturbed: others + unaccounted {oth:.0f}% "
                                f"({s.others_top})[/]" if s.disturbed else "")
                        err.print(f"  round {rnd + 1}/{rounds} {CONFIGS[k].label:30s} "
                                  f"{s.rate:10.0f} {s.unit:6s} errors "
                                  f"{sum(s.errors.values())}{note}")
                        if s.used:
                            break
                        err.print("  ... measuring it again in 2 s")
                        time.sleep(2)
        for name, srv in servers.items():
            if srv.proc.poll() is not None:
                raise RuntimeError(f"server {name} died during the run "
                                   f"(exit {srv.proc.returncode})")
    finally:
        for srv in servers.values():
            stop(srv.proc, signal.SIGQUIT if srv.kind == "nginx" else signal.SIGTERM, grace=10)
            if srv.tmp:
                shutil.rmtree(srv.tmp, ignore_errors=True)
        stop_all(NGINX)
        shutil.rmtree(logdir, ignore_errors=True)
    rows = summarize(samples)
    print_tables(rows, samples, header)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "summary": rows,
                       "samples": [s.__dict__ for s in samples]}, f, indent=1, default=str)
        err.print(f"raw samples written to {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        stop_all(NGINX)
        err.print("interrupted: everything started was stopped.")
        sys.exit(130)
