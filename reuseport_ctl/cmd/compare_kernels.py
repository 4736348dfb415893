"""`reuseport-ctl compare-kernels A B`: verify, doctor and a distribution
fingerprint on two kernels, side by side, differences picked out."""
from __future__ import annotations

import json
import os
import sys

import click

from ..errors import UserError
from ._common import console, memory_size

EPILOG = """\b
Examples:
  reuseport-ctl compare-kernels 6.1 6.12          two Debian kernels, one VM boot each
  reuseport-ctl compare-kernels 6.12 ~/src/linux  Debian's 6.12 against your build tree
  reuseport-ctl compare-kernels running 6.12      this machine's kernel (no VM) against 6.12
  reuseport-ctl compare-kernels 6.1 6.12 --json > ab.json
  reuseport-ctl compare-kernels --from ab.json    show a saved comparison again
  reuseport-ctl compare-kernels 6.12 ~/src/linux --only migration
                                                  only the migration checks (faster)

\b
A and B are anything `vm --kernel` takes (a Debian series or version, a
bzImage, a kernel build tree) or `running`. Each kernel boots once in a VM
(TCG on a host without usable KVM: minutes each) and runs `doctor --json`,
`verify --json`, `remap` (2-4 sockets and back, 1000 flows, policies kernel and hash)
and `run --workers 4 --load 400`; the kernels run one after the other.
Progress goes to stderr. Shown: the checks whose result differs, every moved
fraction with its noise (≠ where A and B differ by more), the spread of
connections over members (verify's distribution checks and the run), and
doctor's differences. Exit status: 1 when a kernel could not be run or a
check fails on B but not on A (usable with `git bisect run`), else 0.
"""


def _check_kernel(spec: str) -> None:
    """Before anything boots: a kernel that cannot be had is one sentence."""
    if spec == "running":
        return
    from ..vm import vm_available
    ok, why = vm_available(spec)
    if not ok:
        raise UserError(f"cannot run kernel {spec!r}: {why}")


def _load(path: str) -> dict:
    try:
        with open(path) as fh:
            record = json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}.") from None
    if not (isinstance(record, dict) and isinstance(record.get("kernels"), list)
            and len(record["kernels"]) == 2):
        raise UserError(f"{path} is not a compare-kernels --json record.")
    return record


@click.command("compare-kernels", epilog=EPILOG)
@click.argument("kernel_a", required=False)
@click.argument("kernel_b", required=False)
@click.option("--json", "as_json", is_flag=True,
              help="Print everything as one JSON object (each kernel's raw verify, doctor, "
                   "remap and run output, and the comparison).")
@click.option("--from", "from_file", type=click.Path(dir_okay=False), default=None,
              help="Show a saved --json record instead of running anything.")
@click.option("--only", multiple=True, metavar="PATTERN",
              help="Passed to verify --only (repeatable).")
@click.option("--cpus", default=2, show_default=True, type=click.IntRange(1, 64),
              help="vCPUs per VM.")
@click.option("--memory", default="2G", show_default=True, callback=memory_size,
              help="Memory per VM (MiB, or with M or G).")
@click.option("--check-timeout", default=240.0, show_default=True, type=click.FloatRange(1),
              help="verify --timeout per check in a VM (bcc compiles are slow under TCG).")
def compare_kernels(kernel_a, kernel_b, as_json, from_file, only, cpus, memory,
                    check_timeout):
    """Run the same verify, doctor, remap and a short load on kernel A and
    kernel B, and show them side by side with what differs highlighted."""
    from ..experiments import kernel_ab
    if from_file:
        if kernel_a or kernel_b:
            raise UserError("--from shows a saved comparison: give no kernels with it.")
        record = _load(from_file)
        record["ab"] = kernel_ab.compare(*record["kernels"])   # as today's code compares
    else:
        if not (kernel_a and kernel_b):
            raise UserError("give two kernels to compare, e.g. compare-kernels 6.1 6.12 "
                            "(or ~/src/linux, or running).")
        if os.geteuid() != 0:
            raise UserError("compare-kernels needs root: verify loads BPF programs and the "
                            "VM runner installs and boots kernels; run it with sudo.")
        for spec in (kernel_a, kernel_b):
            _check_kernel(spec)
        click.echo(f"compare-kernels: A {kernel_a}, then B {kernel_b}: doctor, verify, remap "
                   f"and a short run on each (a VM boot each; under TCG minutes each)",
                   err=True)
        record = kernel_ab.run_ab(kernel_a, kernel_b, cpus=cpus, memory=memory,
                                  check_timeout=check_timeout, only=list(only))
    if as_json:
        click.echo(json.dumps(record, indent=2))
    else:
        from ..ui.kernel_ab_view import render_ab
        console(width=140).print(render_ab(record))
    sys.exit(kernel_ab.exit_status(record))


COMMANDS = [compare_kernels]
