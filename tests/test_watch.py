"""`reuseport-ctl watch` as a user runs it: the real binary watching a real
group (ours, or nginx) in a fresh network namespace while a known number of
connections or datagrams arrives; its NDJSON lines and Prometheus metrics
must account for every one of them, and quitting must leave nothing loaded."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nginx import nginx as start_nginx
from reuseport_ctl.kernel import bpf
from reuseport_ctl.load.client import run_load
from reuseport_ctl.policies import Policy
from reuseport_ctl.probes.session import default_strategies
from reuseport_ctl.stats.fairness import jain, max_min_ratio
from reuseport_ctl.workers.supervisor import RunConfig, Supervisor

EXE = shutil.which("reuseport-ctl", path=os.path.dirname(sys.executable)) or "reuseport-ctl"
HOST = "127.0.0.1"
WORKERS = 3
NOBODY = 65534

# The documented NDJSON fields (docs/watch.md), at least these.
TOP_FIELDS = {"ts", "elapsed", "interval", "port", "proto", "policy", "count_of",
              "lookup_strategy", "data_ready_strategy", "wakeups_strategy", "listening",
              "reuseport", "dispatcher",
              "group_size", "lookups", "lookups_per_s", "accepts", "accepts_per_s",
              "data_ready", "data_ready_per_s", "wakeups", "wakeups_per_event", "jain",
              "max_min_ratio", "joined", "left", "moved", "workers", "policy_in_force", "policy_note",
              "policy_owner",
              "drops", "warnings"}
WORKER_FIELDS = {"pid", "slot", "inode", "tids", "child", "conns", "cpu_percent", "accepts", "accepts_per_s", "share",
                 "data_ready", "data_ready_per_s", "wakeups", "wakeups_per_event",
                 "spurious_wakeups", "queue_len", "drops", "stuck", "stopped", "outside"}


def group(proto="tcp", workers=WORKERS, policy="kernel") -> Supervisor:
    return Supervisor(RunConfig(workers=workers, port=0, proto=proto, policy=Policy(policy)))


class Watcher:
    """A `reuseport-ctl watch ...` process; started() returns once it has
    attached its probes (its first stderr line). As a context manager, it is
    killed at the end of the block if it still runs."""

    def __init__(self, *args, preexec=None, **kw):
        self.p = subprocess.Popen([EXE, "watch", *map(str, args)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, bufsize=0, preexec_fn=preexec, **kw)
        self.err = b""

    def started(self, timeout: float = 60.0, until: bytes = b"watching") -> str:
        deadline = time.monotonic() + timeout
        while until not in self.err:
            left = deadline - time.monotonic()
            ready = left > 0 and select.select([self.p.stderr], [], [], left)[0]
            chunk = os.read(self.p.stderr.fileno(), 4096) if ready else b""
            if not chunk:
                self.p.kill()
                out, err = self.p.communicate()
                raise AssertionError(f"watch never started: {(self.err + err).decode()}")
            self.err += chunk
        return self.err.decode()

    def finish(self, sig=None, timeout: float = 30.0, ndjson: bool = True):
        """(exit code, the NDJSON lines parsed (or stdout's text), stderr)."""
        if sig is not None:
            self.p.send_signal(sig)
        out, err = self.p.communicate(timeout=timeout)
        self.err += err
        if not ndjson:
            return self.p.returncode, out.decode(), self.err.decode()
        lines = [json.loads(ln) for ln in out.decode().splitlines() if ln.strip()]
        return self.p.returncode, lines, self.err.decode()

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.communicate()

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def held_bpf_ids(pid: int) -> set[tuple[str, int]]:
    """("prog"|"map"|"link", id) of every BPF object process pid has an fd for."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if not target.startswith("anon_inode:bpf"):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = f.read()
        except OSError:
            continue
        for kind in ("prog", "map", "link"):
            m = re.search(rf"^{kind}_id:\s*(\d+)", info, re.M)
            if m:
                out.add((kind, int(m.group(1))))
    return out


def still_loaded(ids: set[tuple[str, int]], seconds: float = 10.0) -> set:
    """Which of ids the kernel still has, once freeing has settled (bounded):
    the kernel frees a program's maps after an RCU grace period."""
    from reuseport_ctl.kernel import bpf
    deadline = time.monotonic() + seconds
    while True:
        live = {("prog", i) for i in bpf.prog_names()} | {("map", i) for i in bpf.map_names()} \
            | {("link", i) for i in bpf.link_ids()}
        left = ids & live
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def counters(sup: Supervisor, field: str) -> list[int]:
    return [r[field] for r in sup.counters.snapshot()]


def check_line(d: dict, port: int, proto: str) -> None:
    assert TOP_FIELDS <= set(d), TOP_FIELDS - set(d)
    assert (d["port"], d["proto"]) == (port, proto)
    assert d["group_size"] == len(d["workers"])
    for w in d["workers"]:
        assert WORKER_FIELDS <= set(w), WORKER_FIELDS - set(w)
        assert isinstance(w["pid"], int) and isinstance(w["slot"], int)


def settle(get, want, seconds=3.0):
    deadline = time.monotonic() + seconds
    while get() != want and time.monotonic() < deadline:
        time.sleep(0.02)


# --- NDJSON -------------------------------------------------------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_ndjson_accounts_for_every_connection(netns, strategies, proto):
    n = 200
    field = "accepts" if proto == "tcp" else "datagrams"
    with group(proto) as sup:
        sup.start()
        sup.wait_ready()
        with Watcher("--port", sup.port, "--proto", proto, "--json", "--interval", 0.5,
                     "--duration", 3) as w:
            said = w.started()
            assert f"watching {proto} 127.0.0.1:{sup.port} ({WORKERS} workers" in said
            # UDP one at a time: since 6.15 a datagram queued behind another
            # makes no data-ready event, and a foreign server's datagrams are
            # counted by data-ready.
            r = run_load(HOST, sup.port, proto, conns=n, concurrency=4 if proto == "tcp" else 1)
            assert r.ok == n
            settle(lambda: sum(counters(sup, field)), n)
            code, lines, err = w.finish()
        assert code == 0, err
        assert len(lines) >= 4                      # ~3 s at 0.5 s, each on its own line
        for d in lines:
            check_line(d, sup.port, proto)
        last = lines[-1]
        assert last["lookups"] == n                 # one listener lookup per SYN / datagram
        assert last["data_ready"] == n
        assert sum(x["accepts"] for x in last["workers"]) == n == last["accepts"]
        pids = sup.pids()
        assert [(x["slot"], x["pid"]) for x in last["workers"]] == sorted(pids.items())
        # Per worker, the probes' count is the worker's own.
        assert [x["accepts"] for x in last["workers"]] == counters(sup, field)
        counts = [x["accepts"] for x in last["workers"]]
        assert last["jain"] == pytest.approx(jain(counts), abs=1e-4)
        if min(counts):
            assert last["max_min_ratio"] == pytest.approx(max_min_ratio(counts), abs=1e-4)
        assert sum(x["share"] for x in last["workers"]) == pytest.approx(1.0, abs=1e-3)
        assert (last["lookup_strategy"], last["policy"]) == (strategies["lookup"].name,
                                                            "kernel")
        # Totals never go down from one line to the next.
        totals = [d["accepts"] for d in lines]
        assert totals == sorted(totals)


@pytest.mark.parametrize("spurious", [False, True])
def test_spurious_wakeups_of_another_server_are_opt_in(netns, strategies, spurious):
    """Watched as another server (not `run --watch`): only with --spurious is
    the EAGAIN program loaded (on the syscalls tracepoints, which slow every
    syscall on the machine), and then each worker's count is the one the
    worker keeps itself; without it the field is null. (The exact count
    under a herd, where EAGAINs happen, is test_probes'
    test_accept_eagain_matches_workers.)"""
    if strategies["wakeups"].name == "none":
        pytest.skip(f"no wakeup probe: {strategies['wakeups'].reason}")
    n = 60
    with group("tcp") as sup:
        sup.start()
        sup.wait_ready()
        args = ["--spurious"] if spurious else []
        before_ids = set(bpf.prog_names())
        with Watcher("--port", sup.port, "--json", "--interval", 0.5, "--duration", 3, *args) as w:
            w.started()
            loaded = {name for i, name in bpf.prog_names().items() if i not in before_ids}
            eagain0 = counters(sup, "eagain")
            r = run_load(HOST, sup.port, "tcp", conns=n, concurrency=2)
            assert r.ok == n
            settle(lambda: sum(counters(sup, "accepts")), n)
            code, lines, err = w.finish()
        assert code == 0, err
        assert "rp_wk_raw" in loaded or "rp_wk_tp" in loaded       # wakeups are on
        assert ("rp_ea_tp" in loaded) == spurious
        got = [x["spurious_wakeups"] for x in lines[-1]["workers"]]
        if spurious:
            assert got == [b - a for a, b in zip(eagain0, counters(sup, "eagain"))]
        else:
            assert got == [None] * WORKERS


@pytest.mark.parametrize("proto,model,spurious", [
    ("tcp", "shared-epoll", False), ("tcp", "shared-epoll", True),
    ("tcp", "shared-accept", False), ("udp", "shared-accept", True)])
def test_a_listener_shared_without_reuseport(netns, strategies, proto, model, spurious):
    """A pre-fork server without SO_REUSEPORT (one listener, every worker on
    it) is watched too: its workers are the processes that serve the socket
    (not the parent that only holds it), each sees every data-ready of the
    shared listener, and which worker took each connection is known only
    with --spurious (accept() returning a socket); without it accepts and
    the fairness figures are null rather than made up."""
    n = 60
    field = "accepts" if proto == "tcp" else "datagrams"
    cfg = RunConfig(workers=WORKERS, port=0, proto=proto, model=model, policy=Policy("kernel"))
    with Supervisor(cfg) as sup:
        sup.start()
        sup.wait_ready()
        args = ["--spurious"] if spurious else []
        with Watcher("--port", sup.port, "--proto", proto, "--json", "--interval", 0.5,
                     "--duration", 3, *args) as w:
            said = w.started()
            assert f"({WORKERS} workers" in said
            accepts0 = counters(sup, field)
            # UDP one at a time: a datagram queued behind another makes no
            # data-ready event since 6.15
            r = run_load(HOST, sup.port, proto, conns=n, concurrency=2 if proto == "tcp" else 1)
            assert r.ok == n
            settle(lambda: sum(counters(sup, field)), n)
            time.sleep(0.3)
            code, lines, err = w.finish()
        assert code == 0, err
        last = lines[-1]
        assert sorted(x["pid"] for x in last["workers"]) == sorted(sup.pids().values())
        assert last["data_ready"] == n
        assert [x["data_ready"] for x in last["workers"]] == [n] * WORKERS
        got = [x["accepts"] for x in last["workers"]]
        if spurious:
            by_pid = dict(zip(sup.pids().values(),
                              [b - a for a, b in zip(accepts0, counters(sup, field))]))
            assert got == [by_pid[x["pid"]] for x in last["workers"]]
            assert last["accepts"] == n
            assert last["jain"] == pytest.approx(jain(got), abs=1e-4)
        else:
            assert got == [None] * WORKERS
            assert last["jain"] is None and last["max_min_ratio"] is None


# --- Prometheus ---------------------------------------------------------------------------

def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {m.name: m for m in text_string_to_metric_families(text)}


def test_prometheus_counters_match_and_quit_leaves_nothing(netns, cli, strategies):
    n = 150
    with group("tcp") as sup:
        sup.start()
        sup.wait_ready()
        # A policy attached (pinned) by reuseport-ctl is what the header names.
        cli("attach", "--port", sup.port, "--policy", "round-robin", check=True)
        w = Watcher("--port", sup.port, "--interval", 0.2, "--prometheus", "127.0.0.1:0",
                    "--json")
        try:
            said = w.started()
            held = held_bpf_ids(w.p.pid)
            assert {k for k, _ in held} >= {"prog", "map"}
            url = re.search(r"Prometheus metrics on (http://\S+/metrics)", said).group(1)
            assert url.startswith("http://127.0.0.1:")
            r = run_load(HOST, sup.port, "tcp", conns=n, concurrency=4)
            assert r.ok == n

            def accepts() -> dict:
                # a member socket's series is (worker, inode); the pid serving
                # it is reuseport_ctl_worker_process's
                fams = scrape(url)
                pid = {s.labels["inode"]: s.labels["pid"]
                       for s in fams["reuseport_ctl_worker_process"].samples}
                return {(s.labels["worker"], pid[s.labels["inode"]]): s.value
                        for s in fams["reuseport_ctl_worker_accepts"].samples
                        if s.name == "reuseport_ctl_worker_accepts_total"}
            deadline = time.monotonic() + 10
            while sum(accepts().values()) != n and time.monotonic() < deadline:
                time.sleep(0.1)
            fams = scrape(url)
            got = accepts()
            assert sum(got.values()) == n
            assert got == {(str(i), str(p)): c for (i, p), c in
                           zip(sorted(sup.pids().items()), counters(sup, "accepts"))}
            assert sorted(got.values()) == [n // WORKERS] * WORKERS     # round-robin
            assert fams["reuseport_ctl_worker_accepts"].type == "counter"
            lookups = fams["reuseport_ctl_lookups"].samples[0]
            assert lookups.name == "reuseport_ctl_lookups_total" and lookups.value == n
            assert lookups.labels == {"port": str(sup.port), "proto": "tcp"}
            info = fams["reuseport_ctl_group_info"].samples[0].labels
            assert info["policy"] == "round-robin"
            assert fams["reuseport_ctl_group_workers"].samples[0].value == WORKERS
            assert fams["reuseport_ctl_jain_index"].samples[0].value == pytest.approx(1.0)
            assert fams["reuseport_ctl_max_min_ratio"].samples[0].value == pytest.approx(1.0)
            code, lines, err = w.finish(signal.SIGTERM)
        finally:
            w.kill()
            cli("detach", "--port", sup.port)
        assert code == 128 + signal.SIGTERM, err          # a last frame, then 143
        assert "Traceback" not in err
        assert lines[-1]["policy"] == "round-robin"
        assert sum(x["accepts"] for x in lines[-1]["workers"]) == n
    assert still_loaded(held) == set()          # SIGTERM detached and freed every probe


# --- any server: nginx ---------------------------------------------------------------------

@pytest.fixture
def nginx(netns, tmp_path):
    port = 18181
    with start_nginx(port, tmp_path) as (p, workers):
        yield port, p.pid, workers


def test_watching_nginx_shows_its_workers_and_shares(nginx, strategies):
    port, master, workers = nginx
    n = 300
    with Watcher("--port", port, "--json", "--interval", 0.5, "--duration", 3) as w:
        said = w.started()
        assert "(2 workers" in said
        r = run_load(HOST, port, "tcp", conns=n, concurrency=4)
        assert r.ok == n
        code, lines, err = w.finish()
    assert code == 0, err
    last = lines[-1]
    check_line(last, port, "tcp")
    rows = {x["pid"]: x for x in last["workers"]}
    assert sorted(rows) == workers and master not in rows     # the workers, not the master
    assert sum(x["share"] for x in rows.values()) == pytest.approx(1.0, abs=1e-3)
    assert sum(x["accepts"] for x in rows.values()) == n
    # nginx names the worker that answered (X-Worker: $pid): the same split.
    assert {str(p): x["accepts"] for p, x in rows.items() if x["accepts"]} == r.per_worker
    assert last["lookups"] == n                                # only the load's SYNs


def test_watching_nginx_without_reuseport(netns, tmp_path, strategies):
    """nginx's classic setup (one listener, every worker epolls it; with
    --spurious each worker's accept() says who took the connection): the
    workers and the split nginx itself reports. The same workers also serve
    a second port, whose connections must not be counted."""
    port, other, n = 18183, 18184, 200
    with start_nginx(port, tmp_path, reuseport=False, also=other) as (p, workers):
        with Watcher("--port", port, "--json", "--interval", 0.5, "--duration", 3,
                     "--spurious") as w:
            said = w.started()
            assert "(2 workers" in said
            assert run_load(HOST, other, "tcp", conns=50, concurrency=4).ok == 50
            r = run_load(HOST, port, "tcp", conns=n, concurrency=4)
            assert r.ok == n
            time.sleep(0.3)
            code, lines, err = w.finish()
    assert code == 0, err
    last = lines[-1]
    check_line(last, port, "tcp")
    assert last["reuseport"] is False
    rows = {x["pid"]: x for x in last["workers"]}
    assert sorted(rows) == workers and p.pid not in rows      # the workers, not the master
    assert last["data_ready"] == n == last["accepts"]
    assert {str(q): x["accepts"] for q, x in rows.items() if x["accepts"]} == r.per_worker


# --- workers come and go --------------------------------------------------------------------

def test_wait_then_a_group_appears_and_a_worker_restarts(netns, strategies):
    """--wait before anything listens; a group appears (all its workers
    join), a worker is killed and restarted on the socket it had (its row,
    a socket, moves to the new pid: no left, no joined), and the view stays
    up throughout."""
    port = 18282
    with Watcher("--port", port, "--json", "--interval", 0.3, "--wait", "--duration", 6) as w:
        said = w.started(until=b"waiting")
        assert "nothing listens on tcp port 18282 yet; waiting" in said
        time.sleep(0.7)
        with Supervisor(RunConfig(workers=2, port=port)) as sup:
            sup.start()
            sup.wait_ready()
            run_load(HOST, port, "tcp", conns=40, concurrency=2)
            time.sleep(0.8)
            victim = sup.pids()[0]
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while sup.pids().get(0, victim) == victim and time.monotonic() < deadline:
                sup.poll()
                time.sleep(0.02)
            sup.wait_ready()
            new = sup.pids()[0]
            final = set(sup.pids().values())
            time.sleep(1.0)
            code, lines, err = w.finish(timeout=30)
    assert code == 0, err
    assert "Traceback" not in err
    for d in lines:
        check_line(d, port, "tcp")
    assert lines[0]["listening"] is False and lines[0]["workers"] == []
    assert any(d["listening"] for d in lines)
    joined = [r["pid"] for d in lines for r in d["joined"]]
    left = [r["pid"] for d in lines for r in d["left"]]
    assert sorted(joined) == sorted(final - {new} | {victim}) and left == []
    # the restarted worker inherits its socket: the row (a socket) moved to it
    moved = [m for d in lines for m in d["moved"]]
    assert moved and moved[0]["was"] == victim and moved[-1]["pid"] == new
    assert len({(m["slot"], m["inode"]) for m in moved}) == 1
    assert {x["pid"] for x in lines[-1]["workers"]} == final
    assert lines[-1]["lookups"] == 40


def test_two_watches_side_by_side(netns, strategies):
    n = 60
    with group("tcp") as sup:
        sup.start()
        sup.wait_ready()
        a = Watcher("--port", sup.port, "--json", "--interval", 0.5, "--duration", 4)
        b = Watcher("--port", sup.port, "--json", "--interval", 0.5, "--duration", 4)
        try:
            a.started()
            b.started()
            held = held_bpf_ids(a.p.pid) | held_bpf_ids(b.p.pid)
            assert not held_bpf_ids(a.p.pid) & held_bpf_ids(b.p.pid)    # each its own
            run_load(HOST, sup.port, "tcp", conns=n, concurrency=2)
            ra, rb = a.finish(), b.finish()
        finally:
            a.kill()
            b.kill()
        for code, lines, err in (ra, rb):
            assert code == 0, err
            assert lines[-1]["lookups"] == n
            assert [x["accepts"] for x in lines[-1]["workers"]] == counters(sup, "accepts")
    assert still_loaded(held) == set()


# --- quitting -------------------------------------------------------------------------------

def test_q_quits_the_dashboard(netns, strategies):
    with group("tcp") as sup:
        sup.start()
        sup.wait_ready()
        master, slave = pty.openpty()
        w = Watcher("--port", sup.port, "--interval", 0.2, stdin=slave)
        os.close(slave)
        try:
            w.started()
            time.sleep(0.5)
            os.write(master, b"q")
            code, out, err = w.finish(timeout=10, ndjson=False)
        finally:
            w.kill()
            os.close(master)
        assert code == 0, err
        assert "Traceback" not in err
        assert f"{WORKERS} workers" in out and "q quits" in out         # stdin is a tty


def test_run_watch_shows_our_own_group(netns, strategies):
    n = 90
    p = subprocess.Popen([EXE, "run", "--workers", "2", "--port", "0", "--watch", "--duration",
                          "5", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    w = Watcher.__new__(Watcher)
    w.p, w.err = p, b""
    try:
        said = w.started()
        port = int(re.search(r"watching tcp 127\.0\.0\.1:(\d+) \(2 workers", said).group(1))
        assert run_load(HOST, port, "tcp", conns=n, concurrency=2).ok == n
        out, err = p.communicate(timeout=30)
    finally:
        w.kill()
    assert p.returncode == 0, err
    assert "Traceback" not in err.decode()
    rep = json.loads(out)                   # run's own summary, after the dashboard
    assert rep["total"] == n


# --- bad input: one sentence, never a traceback -----------------------------------------------

def one_sentence(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("reuseport-ctl: ") and lines[0].endswith(".")
    assert "Traceback" not in err
    return lines[0]


def test_nothing_listening_says_so(netns, cli):
    p = cli("watch", "--port", 18383, "--duration", 1)
    assert p.returncode == 1
    msg = one_sentence(p.stderr)
    assert "nothing is listening on tcp port 18383" in msg and "--wait" in msg


def test_wait_keeps_waiting_until_duration(netns, cli, strategies):
    t0 = time.monotonic()
    p = cli("watch", "--port", 18384, "--wait", "--duration", 1.5, "--json", "--interval", 0.5)
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - t0 >= 1.5
    lines = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert lines and all(d["listening"] is False and d["workers"] == [] for d in lines)
    assert "waiting" in p.stderr


def test_not_root_is_one_sentence(netns):
    """Without capabilities (uid 0 kept, so the interpreter under /root is
    still readable; every capability dropped, as for an ordinary user)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    p = subprocess.run([setpriv, "--bounding-set=-all", "--inh-caps=-all", EXE, "watch",
                        "--port", "80"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "needs root" in one_sentence(p.stderr)


@pytest.mark.parametrize("args,word", [
    (["--port", 0], "port 0"), (["--port", 80, "--interval", 0], "--interval"),
    (["--port", 80, "--duration", -1], "--duration"),
    (["--port", 80, "--prometheus", "nowhere:x", "--wait"], "--prometheus")])
def test_bad_options_are_one_sentence(netns, cli, args, word):
    p = cli("watch", *args)
    assert p.returncode == 1
    assert word in one_sentence(p.stderr)


def test_a_kernel_without_data_ready_says_what_is_still_shown(netns):
    """Forced: the data-ready and wakeup probes off (as on a kernel with
    neither kprobes nor the tracepoint); lookups and queues still show."""
    from reuseport_ctl.watching import ForeignSource, Watch
    from reuseport_ctl.probes.strategy import Strategy
    chosen = dict(default_strategies(), data_ready=Strategy("none", "forced"),
                  wakeups=Strategy("none", "forced"))
    with group("tcp") as sup:
        sup.start()
        sup.wait_ready()
        with Watch(ForeignSource(sup.port, "tcp", None, None), 0.5, as_json=True,
                   strategies=chosen) as w:
            assert "neither a kprobe on sock_def_readable nor the sock:sk_data_ready" in w.note
            assert "still shown" in w.note
            run_load(HOST, sup.port, "tcp", conns=10, concurrency=1)
            time.sleep(0.2)
            w.ndjson.out = open(os.devnull, "w")
            w.tick(wait=False)
            f = w.frame
            assert len(f.rows) == WORKERS
            assert all(r.accepts is None and r.data_ready is None for r in f.rows)
            if chosen["lookup"].name != "none":
                assert f.lookups == 10


PIDNS_SCRIPT = """
R={exe}
$R run --workers 2 --port 8080 --duration 60 >/dev/null 2>&1 &
$R watch --port 8080 --wait --json --interval 0.5 --duration 12 >{out} 2>{err} &
w=$!
while ! grep -q watching {err}; do sleep 0.2; done
$R load --port 8080 --conns 100 >/dev/null
wait $w
"""


def test_in_a_pid_namespace_of_its_own_wakeups_are_unknown_not_zero(netns, tmp_path):
    """In a container's pid namespace the kernel's pids (what BPF sees) are
    not the pids /proc shows: wakeups are said to be not counted (null), and
    the per-socket counts stay exact."""
    exe = os.path.join(os.path.dirname(sys.executable), "reuseport-ctl")
    out, err = tmp_path / "out", tmp_path / "err"
    script = PIDNS_SCRIPT.format(exe=exe, out=out, err=err)
    subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script],
                   check=True, timeout=90)
    last = json.loads(out.read_text().splitlines()[-1])
    assert last["wakeups_strategy"] == "none" and last["wakeups"] is None
    assert all(r["wakeups"] is None for r in last["workers"])
    assert last["data_ready"] == 100 and sum(r["accepts"] for r in last["workers"]) == 100
    assert "pid namespace of its own" in err.read_text()
