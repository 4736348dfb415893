"""Runs inside a `vm --cpus 4 --nic-queues 4 --numa ... --numa ...` guest
for tests/test_vm.py's NIC test: prints one JSON object (zlib and base64,
one line) with what the host side asserts on: `nic --json` and `ethtool -l/-x` (as text) of the same device; the queue policy's proof; with `nic --apply --cpus 3,2,1,0` (queue
q's IRQ on CPU 3 - q) the cpu policy's and the numa policy's proofs; with
`nic --apply --cpus 3,2,1,0 --rss-weights 1,0,0,0` every connection on
queue 0 and worker 0; and both `--apply`/`--restore` round trips (ethtool -x
and every /proc/irq/*/smp_affinity_list before, during and after).

While the queue proof runs, watch's own engine (watching.Watch over
ForeignSource, as `watch --port 8080 --json` builds it) counts where each
member's connections arrived; its per-member `watch --json` fields come back
with the proof's ground truth (each accepted socket's SO_INCOMING_NAPI_ID and
SO_INCOMING_CPU). Only its live-connection probe (bpf/conns.h, where the
arrival counts come from) is attached: the lookup, data-ready and wakeup
probes feed none of those fields and would cost two more bcc compiles
under TCG. It compiles in a thread while `nic` and `ethtool` run.

The CLI runs in this one process (click's runner, the same commands and
error handling as the installed script): under TCG each new Python and its
imports cost seconds."""
from __future__ import annotations

import base64
import glob
import io
import json
import os
import subprocess
import sys
import threading
import time
import zlib


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True)


def affinities() -> dict[str, str]:
    out = {}
    for p in sorted(glob.glob("/proc/irq/*/smp_affinity_list")):
        with open(p) as f:
            out[p] = f.read()
    return out


class Done:
    def __init__(self, returncode: int, stdout: str, stderr: str = ""):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(*args: str) -> Done:
    from click.testing import CliRunner

    from reuseport_ctl.cli import main
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return Done(r.exit_code, r.output)


WATCH_FIELDS = ("slot", "pid", "inode", "live_conns", "rx_cpus", "napi_ids", "rx_queues",
                "rx_paths")


class Watching(threading.Thread):
    """watch's engine on `port`, built in a thread (the bcc compile releases
    the GIL): .w is the Watch, or .err why not."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.w, self.err, self.took = port, None, "", 0.0
        self.start()

    def run(self) -> None:
        from reuseport_ctl.probes.strategy import Strategy
        from reuseport_ctl.watching import ForeignSource, Watch
        t = time.monotonic()
        try:
            off = Strategy("none", "the NIC test counts where connections arrived only")
            self.w = Watch(ForeignSource(self.port, "tcp", None, None), 1.0,
                           strategies={k: off for k in ("lookup", "data_ready", "wakeups")})
        except Exception as e:          # reported, and asserted on by the host side
            self.err = f"{type(e).__name__}: {e}"
        self.took = time.monotonic() - t


def watched(w, socks) -> dict:
    """The watch's frame now, as `watch --json` writes it (the arrival
    fields), the dashboard as it draws it, and the group's sockets' inodes
    (slot order: the policy's) to match its members by."""
    from rich.console import Console

    from reuseport_ctl.export.ndjson import frame_dict
    from reuseport_ctl.kernel import btf
    from reuseport_ctl.probes.conns import QUEUE_FIELD
    from reuseport_ctl.ui.dashboard import render
    w.tick(wait=True)
    d = frame_dict(w.frame, w.group)
    buf = io.StringIO()
    Console(file=buf, width=140, color_system=None).print(render(w.frame, w.group, w.note))
    try:
        queue_off = btf.member_offset(*QUEUE_FIELD["SK_RX_QUEUE_OFF"])
    except btf.BTFError as e:
        queue_off = str(e)
    return {"rx_note": d["rx_note"], "rx_unknown": w.session.rx_unknown,
            "live": w.session.strategies["live"].name,
            "workers": [{k: r[k] for k in WATCH_FIELDS} for r in d["workers"]],
            "inodes": [os.fstat(s.fileno()).st_ino for s in socks],
            "btf_sk_rx_queue_mapping": queue_off, "dashboard": buf.getvalue()}


def main() -> None:
    iface = os.environ["REUSEPORT_CTL_VM_NIC"]
    t0 = time.monotonic()
    out: dict = {"iface": iface}
    # imported here, not in two threads at once
    import reuseport_ctl.cli, reuseport_ctl.kernel.bcc, reuseport_ctl.probes.session  # noqa
    import reuseport_ctl.watching  # noqa: F401
    watching = Watching(8080)           # port 8080: the queue proof's group
    nic = cli("nic", iface, "--json")
    out["nic_rc"], out["nic_err"] = nic.returncode, nic.stderr[-2000:]
    out["nic"] = json.loads(nic.stdout) if nic.returncode == 0 else None
    out["ethtool_l"] = sh("ethtool", "-l", iface).stdout
    out["ethtool_x"] = sh("ethtool", "-x", iface).stdout
    out["t_nic"] = time.monotonic() - t0

    from reuseport_ctl.errors import UserError
    from reuseport_ctl.experiments import queue_proof as qp
    from reuseport_ctl.kernel.nic import cpu_nodes

    def attempt(key: str, fn, *args, **kw) -> None:
        try:
            out[key] = fn(*args, **kw)
            out[key + "_err"] = ""
        except UserError as e:
            out[key], out[key + "_err"] = None, str(e)
        out["t_" + key] = time.monotonic() - t0

    def state() -> tuple[str, dict[str, str]]:
        return sh("ethtool", "-x", iface).stdout, affinities()

    watching.join()                     # one bcc compile at a time
    w, out["watch_err"] = watching.w, watching.err
    out["t_watch_attach"], out["t_watch_ready"] = watching.took, time.monotonic() - t0
    # one queue-policy group (one eBPF compile) serves the queue proof and
    # the proof after the RSS table moved; the watch counts the queue proof's
    with qp.Group(8080, len(out["nic"]["interfaces"][0]["rx"]), "queue") as qg:
        try:
            if w is not None:
                w.tick(wait=True)       # the members get their cookies before any connection
            attempt("proof", qp.prove, iface, conns=16, per_queue=2, group=qg)
            out["t_watch_proof"] = time.monotonic() - t0
            out["watch"] = watched(w, qg.socks) if w is not None else None
        finally:
            if w is not None:
                w.close()
        out["t_watch"] = time.monotonic() - t0
        out["proof_rc"] = 0 if out["proof"] and out["proof"]["exact"] else 1
        napi_of = {n: int(q) for q, n in (out["proof"] or {}).get("napi_of_queue", {}).items()}

        before = state()
        # IRQ affinity permuted (queue q on CPU 3 - q): cpu and numa, 16 conns each
        ap = cli("nic", iface, "--apply", "--yes", "--cpus", "3,2,1,0")
        during = state()
        attempt("cpu", qp.prove_cpus, iface, "cpu", conns=16, port=8081, napi_of=napi_of)
        if len(set(cpu_nodes().values())) > 1:
            attempt("numa", qp.prove_cpus, iface, "numa", conns=16, port=8082,
                    napi_of=napi_of)
        rs = cli("nic", iface, "--restore")
        out["apply_cpus"] = {"rc": ap.returncode, "out": ap.stdout + ap.stderr,
                             "restore_rc": rs.returncode, "restore_out": rs.stdout + rs.stderr,
                             "before": before, "during": during, "after": state()}

        # all RSS weight on queue 0 (and the IRQs moved): every connection there
        before = state()
        ap = cli("nic", iface, "--apply", "--yes", "--cpus", "3,2,1,0",
                 "--rss-weights", "1,0,0,0")
        during = state()
        attempt("on_queue", qp.prove_on_queue, iface, 0, conns=8, napi_of=napi_of, group=qg)
        rs = cli("nic", iface, "--restore")
        out["apply"] = {"rc": ap.returncode, "out": ap.stdout + ap.stderr,
                        "restore_rc": rs.returncode, "restore_out": rs.stdout + rs.stderr,
                        "before": before, "during": during, "after": state()}
    out["t_all"] = time.monotonic() - t0
    # the proofs as a reader sees them (stderr streams back to the host)
    for key, show in (("proof", qp.render), ("cpu", qp.render_cpus), ("numa", qp.render_cpus),
                      ("on_queue", qp.render_on_queue)):
        if out.get(key):
            print(show(out[key]), file=sys.stderr)
    # Compressed since the runner once passed only 32 KiB of a guest's
    # stdout (vm/guest_relay.py fixed that; docs/vm.md); one short line is
    # still the cheapest thing to carry (tests/test_vm.py: guest_result).
    print(base64.b64encode(zlib.compress(json.dumps(out).encode(), 9)).decode())


if __name__ == "__main__":
    main()
