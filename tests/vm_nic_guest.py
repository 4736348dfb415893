"""Runs inside a `vm --cpus 4 --nic-queues 4 --numa ... --numa ...` guest
for tests/test_vm.py's NIC test: prints one JSON object with what the host
side asserts on: `nic --json` and `ethtool -l/-x` (as text) of the same
device; the queue policy's proof; with `nic --apply --cpus 3,2,1,0` (queue
q's IRQ on CPU 3 - q) the cpu policy's and the numa policy's proofs; with
`nic --apply --cpus 3,2,1,0 --rss-weights 1,0,0,0` every connection on
queue 0 and worker 0; and both `--apply`/`--restore` round trips (ethtool -x
and every /proc/irq/*/smp_affinity_list before, during and after).

The CLI runs in this one process (click's runner, the same commands and
error handling as the installed script): under TCG each new Python and its
imports cost seconds."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time


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


def main() -> None:
    iface = os.environ["REUSEPORT_CTL_VM_NIC"]
    t0 = time.monotonic()
    out: dict = {"iface": iface}
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

    # one queue-policy group (one eBPF compile) serves the queue proof and
    # the proof after the RSS table moved
    with qp.Group(8080, len(out["nic"]["interfaces"][0]["rx"]), "queue") as qg:
        attempt("proof", qp.prove, iface, conns=16, per_queue=2, group=qg)
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
    print(json.dumps(out))


if __name__ == "__main__":
    main()
