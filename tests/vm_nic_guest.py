"""Runs inside a `vm --cpus 4 --nic-queues 4` guest for tests/test_vm.py's
NIC test: prints one JSON object with what the host side asserts on:
`nic --json` and `ethtool -l/-x` (as text) of the same device, the queue
policy's proof, and an `nic --apply`/`--restore` round trip (ethtool -x and
every /proc/irq/*/smp_affinity_list before, during and after).

The CLI runs in this one process (click's runner, the same commands and
error handling as the installed script): under TCG each new Python and its
imports cost seconds."""
from __future__ import annotations

import glob
import json
import os
import subprocess
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
    from reuseport_ctl.experiments.queue_proof import prove
    try:
        out["proof"] = prove(iface, conns=16, per_queue=2)
        out["proof_rc"], out["proof_err"] = (0 if out["proof"]["exact"] else 1), ""
    except UserError as e:
        out["proof"], out["proof_rc"], out["proof_err"] = None, 1, str(e)
    out["t_proof"] = time.monotonic() - t0

    before = (sh("ethtool", "-x", iface).stdout, affinities())
    ap = cli("nic", iface, "--apply", "--yes", "--cpus", "3,2,1,0", "--rss-weights", "1,0,0,0")
    during = (sh("ethtool", "-x", iface).stdout, affinities())
    rs = cli("nic", iface, "--restore")
    after = (sh("ethtool", "-x", iface).stdout, affinities())
    out["apply"] = {"rc": ap.returncode, "out": ap.stdout + ap.stderr,
                    "restore_rc": rs.returncode, "restore_out": rs.stdout + rs.stderr,
                    "before": before, "during": during, "after": after}
    out["t_all"] = time.monotonic() - t0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
