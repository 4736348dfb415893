"""`reuseport-ctl vm`: boot another kernel in QEMU and run one command in it."""
from __future__ import annotations

import os
import sys

import click

from ..errors import UserError
from ._common import memory_size

EPILOG = """\b
Examples:
  reuseport-ctl vm --kernel 6.12 -- reuseport-ctl doctor
                         Debian's newest installed 6.12 cloud kernel (installed on
                         first use, with its headers); kprobes work there
  reuseport-ctl vm --kernel 6.1 -- reuseport-ctl verify --tap
  reuseport-ctl vm --kernel ~/linux -- reuseport-ctl doctor
                         the kernel you just built (a tree with arch/x86/boot/bzImage)
  reuseport-ctl vm --kernel ./bzImage --timeout 120 -- 'uname -r; dmesg | tail'
                         one argument is a shell command line
  reuseport-ctl vm --list-kernels
  reuseport-ctl vm --cpus 4 --nic-queues 4 -- 'reuseport-ctl nic $REUSEPORT_CTL_VM_NIC'
                         a 4-queue virtio-net NIC with RSS; its host side (a tap in
                         a private network namespace) is $REUSEPORT_CTL_VM_PEER
  reuseport-ctl vm --cpus 4 --numa 1G,cpus=0-1 --numa 1G,cpus=2-3 -- 'grep . /sys/devices/system/node/node*/cpulist'

\b
The guest sees this machine's root filesystem read-only (with throw-away
writable /tmp, /var, /etc), runs the command as root with your environment,
and its output streams back. With --nic-queues the guest command finds its
NIC in $REUSEPORT_CTL_VM_NIC (192.0.2.2) and the host side in
$REUSEPORT_CTL_VM_PEER (192.0.2.1). KVM is used when a test guest runs under it,
TCG otherwise (the first line says which). Exit status: the command's own;
124 on time-out, 125 when the VM could not be set up or did not boot, 130 on
Ctrl-C. The VM never outlives the command. scripts/vm is the same command.
"""


@click.command("vm", epilog=EPILOG,
               context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--kernel", "-k", default="6.12", show_default=True,
              help="A Debian kernel version (6.12, 6.1, 6.12.117+deb12), a bzImage, "
                   "or a kernel build tree.")
@click.option("--cpus", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--memory", default="2G", show_default=True, callback=memory_size,
              help="Guest memory (QEMU -m): MiB, or with M or G.")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(1),
              help="Seconds for the whole run, boot included; then the VM is killed.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto",
              show_default=True, help="auto: KVM when a test guest runs under it, else TCG.")
@click.option("--nic-queues", type=click.IntRange(1, 16), default=None,
              help="Give the guest a virtio-net NIC with this many queues, RSS and hash "
                   "reporting, over a multi-queue tap in a private host network namespace "
                   "(192.0.2.1; the guest is 192.0.2.2).")
@click.option("--numa", multiple=True, metavar="MEM[,cpus=A-B]",
              help="A NUMA node for the guest (vng --numa), once per node.")
@click.option("--list-kernels", is_flag=True, help="List the Debian kernels installed and offered.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def vm(kernel, cpus, memory, timeout, accel, nic_queues, numa, list_kernels, command):
    """Boot KERNEL under QEMU (virtme-ng) over this machine's root
    filesystem, run COMMAND in it as root, and exit with its status."""
    from ..vm import kernels, runner
    if list_kernels:
        inst = kernels.installed_releases()
        avail = kernels.available_releases()
        click.echo("installed: " + (", ".join(inst) or "none"))
        click.echo("offered:   " + (kernels.describe_available(avail) or "none (apt-get update?)"))
        return
    if os.geteuid() != 0:
        raise UserError("vm needs root: it installs kernels with apt, builds the guest's "
                        "initramfs and runs QEMU over this machine's root filesystem; run "
                        "it with sudo.")
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    res = runner.run(command, kernel, cpus=cpus, memory=memory, timeout=timeout, accel=accel,
                     nic_queues=nic_queues or 0, numa=list(numa) or None)
    sys.exit(res.exit_code)


COMMANDS = [vm]
