#!/usr/bin/env python3
"""What `reuseport-ctl watch` costs the server it watches, and itself.

    .venv/bin/python benchmarks/watch_overhead.py [--pairs N] [--window S] [--json FILE]

One nginx (2 workers, `listen ... reuseport`) on loopback, one client (wrk
-t2 -c32, a new connection per request) running without a break for the
whole benchmark. Its connections/s are counted in windows of S seconds from
the network namespace's TCP PassiveOpens (every connection nginx accepted),
and the windows alternate:

  A  no watch
  B  `reuseport-ctl watch --port P --json --interval 1` running with its
     default probes (sk_lookup observer, sk_data_ready and sched_waking raw
     tracepoints with their scope ends), its NDJSON going to /dev/null
  C  the same with --spurious: also the syscalls tracepoints counting
     accept4() returning EAGAIN

in the order A B A C A B A C ... A. A watch is started before its window
(bcc compiles and attaches first: not counted) and stopped after it. Each B
or C window is compared with the mean of the A windows either side of it,
which cancels the slow drift of this shared machine's speed (a steady load
moves by ~7 % between 3 s windows and more over a minute).

Reported: connections/s B ÷ A (median of those per-window ratios; goal
>= 0.97) and C ÷ A, the watch process's own CPU over each window as % of one
core (goal <= 5 %), and with --bpf-stats its BPF programs' run time
(kernel.bpf_stats_enabled: the in-kernel cost, paid by whichever CPU handles
the packet).

Loopback only, inside a private network namespace (harness.private_netns).
Everything it starts is stopped on exit, Ctrl-C, SIGTERM and errors.
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
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from harness import NGINX, exit_on_sigterm, private_netns, spawn, start_nginx, stop, stop_all

HERE = Path(__file__).resolve()
VENV_BIN = Path(sys.executable).parent
RPCTL = shutil.which("reuseport-ctl", path=str(VENV_BIN)) or str(VENV_BIN / "reuseport-ctl")
WRK = shutil.which("wrk") or "/usr/bin/wrk"
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
PORT = 18590
CONC = 32
GOAL_RATIO, GOAL_CPU = 0.97, 5.0
DISTURBED = 15.0            # % of one core used by processes not ours voids a sample

err = Console(stderr=True)


SIDES = {"A": None, "B": [], "C": ["--spurious"]}     # side -> watch's extra arguments


def start_watch(extra: list[str]) -> subprocess.Popen:
    """`watch --json` to /dev/null; returns once its probes are attached."""
    p = spawn([RPCTL, "watch", "--port", str(PORT), "--json", "--interval", "1", *extra],
              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    said = b""
    deadline = time.monotonic() + 60
    while b"watching" not in said:
        chunk = p.stderr.readline()
        if not chunk or time.monotonic() > deadline:
            stop(p)
            raise RuntimeError(f"watch did not start: {said.decode()}")
        said += chunk
    return p


def bpf_prog_stats(pid: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over the BPF programs pid holds."""
    ns = cnt = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        m1 = re.search(r"^run_time_ns:\s*(\d+)", info, re.M)
        m2 = re.search(r"^run_cnt:\s*(\d+)", info, re.M)
        ns += int(m1.group(1)) if m1 else 0
        cnt += int(m2.group(1)) if m2 else 0
    return ns, cnt


_HZ = os.sysconf("SC_CLK_TCK")


def all_times() -> dict[int, float]:
    """pid -> user+system CPU seconds, every process (from /proc/PID/stat)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                data = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            rest = data[data.rfind(b")") + 2:].split()
            out[int(name)] = (int(rest[11]) + int(rest[12])) / _HZ
    return out


def ours() -> set[int]:
    """This harness and everything below it (nginx, wrk, watch)."""
    me = psutil.Process()
    return {me.pid} | {c.pid for c in me.children(recursive=True)}


def start_wrk(seconds: int) -> subprocess.Popen:
    return spawn([WRK, "-t2", f"-c{CONC}", f"-d{seconds}s", "--timeout", "2s",
                  "-H", "Connection: close", f"http://127.0.0.1:{PORT}/"],
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def passive_opens() -> int:
    """Connections accepted in this network namespace so far (TCP PassiveOpens)."""
    rows = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
            if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("PassiveOpens")])


def window(side: str, seconds: float, watch: subprocess.Popen | None) -> dict:
    """Connections/s over one window, and what the watch and everyone else used."""
    if watch is not None:
        proc = psutil.Process(watch.pid)
        c0, bpf0 = sum(proc.cpu_times()[:2]), bpf_prog_stats(watch.pid)
    before, o0, t0 = all_times(), passive_opens(), time.monotonic()
    time.sleep(seconds)
    o1, wall = passive_opens(), time.monotonic() - t0
    after, mine = all_times(), ours()
    others = sum(after[p] - before.get(p, 0.0) for p in after if p not in mine)
    out = {"side": side, "conn_s": (o1 - o0) / wall, "others_cpu_pct": 100 * others / wall}
    if watch is not None:
        c1, bpf1 = sum(proc.cpu_times()[:2]), bpf_prog_stats(watch.pid)
        runs = bpf1[1] - bpf0[1]
        out.update(watch_cpu_pct=100 * (c1 - c0) / wall,
                   bpf_cpu_pct=100 * (bpf1[0] - bpf0[0]) / 1e9 / wall,
                   bpf_runs_s=runs / wall,
                   bpf_ns_per_run=(bpf1[0] - bpf0[0]) / runs if runs else None)
    return out


def quartiles(xs: list[float]) -> str:
    """'q1-q3' of the ratios, or '' with fewer than two."""
    if len(xs) < 2:
        return ""
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return f"{q1:.3f}-{q3:.3f}"


def plan(pairs: int) -> list[str]:
    """A B A C A B A C ... A: every B and C between two A windows."""
    out = ["A"]
    for i in range(pairs):
        out += ["B", "A"] if i % 2 == 0 else ["C", "A"]
    return out


def ratios(samples: list[dict], side: str) -> list[float]:
    """Each `side` window over the mean of the A windows either side of it."""
    return [s["conn_s"] / ((samples[i - 1]["conn_s"] + samples[i + 1]["conn_s"]) / 2)
            for i, s in enumerate(samples) if s["side"] == side]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=24,
                    help="B and C windows (half each), each between two A windows")
    ap.add_argument("--window", type=float, default=3.0, help="seconds per window")
    ap.add_argument("--json", metavar="FILE", help="write every sample here")
    ap.add_argument("--bpf-stats", action="store_true",
                    help="also measure the probes' in-kernel run time (kernel.bpf_stats_enabled; "
                         "the accounting itself slows every BPF program a little)")
    args = ap.parse_args()
    if args.pairs < 2 or not args.window > 0:
        sys.exit("watch_overhead.py: --pairs must be at least 2 (one B and one C window) "
                 "and --window positive.")
    for tool in (WRK, NGINX):
        if not os.path.exists(tool):
            sys.exit(f"watch_overhead.py: needs {tool}.")
    where = private_netns("watch_overhead.py")
    exit_on_sigterm()
    env = {"kernel": platform.release(), "cpus": os.cpu_count(),
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "pairs": args.pairs, "window_s": args.window, "netns": where,
           "nginx": subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip()}
    order = plan(args.pairs)
    err.print(f"[bold]watch overhead[/] · kernel {env['kernel']} · {env['cpus']} CPUs · "
              f"{env['date']} · {len(order)} windows × {args.window:g} s ({''.join(order)}) · "
              f"wrk -t2 -c{CONC} short connections → nginx 2 workers · {where}")
    tmp = tempfile.mkdtemp(prefix="rpctl-watch-bench-")
    stats_before = BPF_STATS.read_text().strip() \
        if args.bpf_stats and BPF_STATS.exists() else None
    samples: list[dict] = []
    try:
        if stats_before is not None:
            BPF_STATS.write_text("1")
        nginx = start_nginx(PORT, 2, tmp)
        # the whole run, with room for every watch's start (bcc compiles first)
        wrk = start_wrk(int(len(order) * (args.window + 6) + 60))
        time.sleep(5)                                       # past wrk's ramp
        for n, side in enumerate(order):
            watch = start_watch(SIDES[side]) if SIDES[side] is not None else None
            try:
                if watch is not None:
                    time.sleep(1.0)         # past its first interval: steady state
                s = window(side, args.window, watch)
            finally:
                if watch is not None:
                    stop(watch)
            if wrk.poll() is not None:
                raise RuntimeError(f"wrk stopped early: {wrk.stdout.read()}")
            s["n"] = n
            samples.append(s)
            extra = (f"  watch CPU {s['watch_cpu_pct']:.2f}%  BPF {s['bpf_cpu_pct']:.2f}%"
                     if side != "A" else "")
            flag = "  [yellow]disturbed[/]" if s["others_cpu_pct"] >= DISTURBED else ""
            err.print(f"  window {n + 1:2}/{len(order)} {side} {s['conn_s']:9.0f} conn/s{extra}"
                      f"  others {s['others_cpu_pct']:.0f}%{flag}")
            if watch is not None:
                time.sleep(0.5)             # its probes are gone before the next A
        stop(wrk)
        stop(nginx, signal.SIGQUIT)
    finally:
        stop_all(NGINX)
        if stats_before is not None:
            BPF_STATS.write_text(stats_before)
        shutil.rmtree(tmp, ignore_errors=True)

    a = [s["conn_s"] for s in samples if s["side"] == "A"]
    b = [s for s in samples if s["side"] == "B"]
    c = [s["conn_s"] for s in samples if s["side"] == "C"]
    rb, rc = ratios(samples, "B"), ratios(samples, "C")
    ratio, ratio_c = statistics.median(rb), statistics.median(rc)
    cpu = statistics.median(s["watch_cpu_pct"] for s in b)
    bpf = statistics.median(s["bpf_cpu_pct"] for s in b) if args.bpf_stats else None
    ns_run = statistics.median(s["bpf_ns_per_run"] or 0 for s in b) if args.bpf_stats else None
    t = Table(title=f"reuseport-ctl watch overhead · kernel {env['kernel']} · {env['cpus']} CPUs "
                    f"· {len(order)} windows × {args.window:g} s, one wrk run",
              title_justify="left")
    t.add_column("measure")
    t.add_column("median", justify="right")
    t.add_column("range (ratios: quartiles)", justify="right")
    t.add_column("goal", justify="right")
    t.add_column("", justify="left")
    rng = lambda xs: f"{min(xs):,.0f}-{max(xs):,.0f}"  # noqa: E731
    t.add_row("A conn/s, no watch", f"{statistics.median(a):,.0f}", rng(a), "", "")
    t.add_row("B conn/s, watch (default probes)",
              f"{statistics.median(s['conn_s'] for s in b):,.0f}",
              rng([s["conn_s"] for s in b]), "", "")
    t.add_row("C conn/s, watch --spurious", f"{statistics.median(c):,.0f}", rng(c), "", "")
    t.add_row("B ÷ A (each B ÷ its two A's)", f"{ratio:.3f}", quartiles(rb), f"≥ {GOAL_RATIO}",
              "ok" if ratio >= GOAL_RATIO else "MISSED")
    t.add_row("C ÷ A (each C ÷ its two A's)", f"{ratio_c:.3f}", quartiles(rc), "",
              "syscalls tracepoints on")
    t.add_row("watch process CPU, % of one core", f"{cpu:.2f}",
              f"{min(s['watch_cpu_pct'] for s in b):.2f}-{max(s['watch_cpu_pct'] for s in b):.2f}",
              f"≤ {GOAL_CPU:g}", "ok" if cpu <= GOAL_CPU else "MISSED")
    if bpf is not None:
        t.add_row("its BPF programs, % of one core", f"{bpf:.2f}", "", "", "in-kernel, bpf_stats")
        t.add_row("BPF ns per program run", f"{ns_run:.0f}", "", "", "")
    Console().print(t)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "ratio": ratio,
                                               "ratio_spurious": ratio_c, "ratios": rb,
                                               "ratios_spurious": rc, "watch_cpu_pct": cpu,
                                               "bpf_cpu_pct": bpf, "samples": samples},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
