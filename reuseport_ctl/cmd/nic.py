"""`reuseport-ctl nic`: queues, IRQs, RSS and CPU masks of an interface, and
what to change so that the workers line up with where traffic is received."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
from rich.console import Console

from ..errors import UserError
from ._common import in_range

STATE_DIR = Path("/var/cache/reuseport-ctl")

EPILOG = """\b
Examples:
  reuseport-ctl nic                        every non-loopback interface
  reuseport-ctl nic eth0 --json            one interface, as JSON
  reuseport-ctl nic --port 8080            the interfaces carrying port 8080's group,
                                           and whether its workers line up
  reuseport-ctl nic eth0 --apply           write the proposed IRQ affinity and RPS/XPS
                                           masks (asks first; --yes does not)
  reuseport-ctl nic eth0 --restore         put back what --apply changed
  reuseport-ctl nic eth0 --apply --cpus 3,2,1,0 --rss-weights 1,0,0,0 --yes
                                           IRQ of queue q on the q-th CPU listed, and
                                           the RSS table all on queue 0 (ethtool -X
                                           eth0 weight 1 0 0 0); --restore undoes both

\b
It changes nothing by itself. --apply saves the values it replaces in
/var/cache/reuseport-ctl/nic-IFACE.json (masks, IRQ affinity and the RSS
indirection table), which --restore writes back.
"""


@click.command("nic", epilog=EPILOG)
@click.argument("iface", required=False)
@click.option("--port", "-p", type=int, default=None, callback=in_range(1, 65535),
              help="The reuseport group on this port: its interfaces and its workers' CPUs.")
@click.option("--proto", type=click.Choice(["tcp", "udp"]), default="tcp", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--apply", "apply_", is_flag=True,
              help="Write the proposed IRQ affinity and RPS/XPS masks of IFACE (root).")
@click.option("--restore", is_flag=True, help="Undo what --apply changed on IFACE (root).")
@click.option("--yes", "-y", is_flag=True, help="With --apply: do not ask first.")
@click.option("--cpus", "cpus", default=None, metavar="LIST",
              help="Spread the queues over these CPUs, in this order (queue q's IRQ on "
                   "the (q mod n)-th); default: the workers' CPUs, else every CPU.")
@click.option("--rss-weights", default=None, metavar="W0,W1,...",
              help="Also set the RSS indirection table to these queue weights, as "
                   "`ethtool -X IFACE weight W0 W1 ...`.")
def nic(iface, port, proto, as_json, apply_, restore, yes, cpus, rss_weights):
    """Show an interface's queues, their IRQs and CPU affinity, RSS, RPS/XPS
    masks and the CPU -> NUMA node map, with a verdict: which CPUs receive
    traffic, whether the workers line up, and the commands to change it."""
    from ..kernel import nic as knic
    from ..nic.verdict import judge

    if apply_ and restore:
        raise UserError("--apply and --restore undo each other: give one of them.")
    if (apply_ or restore) and not iface:
        raise UserError(f"--{'apply' if apply_ else 'restore'} acts on one interface: name it "
                        f"(reuseport-ctl nic IFACE --{'apply' if apply_ else 'restore'}).")
    if (apply_ or restore) and os.geteuid() != 0:
        raise UserError(f"--{'apply' if apply_ else 'restore'} writes IRQ affinity and RPS/XPS "
                        f"masks, which only root may do: run it as root.")
    targets = _cpus(cpus) if cpus else None
    weights = _weights(rss_weights) if rss_weights else None
    knic.private_sysfs()
    if restore:
        return _restore(iface, as_json)

    workers, addr = _workers(port, proto) if port else (None, None)
    names = [iface] if iface else _default_ifaces(addr)
    topo = knic.topology()
    nics = [knic.read_nic(n) for n in names]
    if targets:
        bad = [c for c in targets if c not in topo.cpus]
        if bad:
            raise UserError(f"--cpus names CPU {','.join(map(str, bad))}, which is not online "
                            f"(online: {knic.format_cpulist(topo.cpus)}).")
    for n in nics:
        if weights and not n.rss.indirection:
            raise UserError(f"--rss-weights needs an RSS indirection table, and {n.name} has "
                            f"none ({n.rss.missing or 'the driver reports none'}).")
        if weights and len(weights) > len(n.rx):
            raise UserError(f"--rss-weights gives {len(weights)} weights and {n.name} has "
                            f"{len(n.rx)} receive queues.")
    verdicts = [judge(n, topo, workers, targets, weights) for n in nics]
    if apply_:
        return _apply(nics[0], verdicts[0], yes, as_json)

    from ..ui.nic_view import nic_report, render_nic
    report = nic_report(nics, verdicts, topo, workers, port)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        console = Console()
        if not console.is_terminal:
            console.width = 110
        console.print(render_nic(report))


def _cpus(text: str) -> list[int]:
    from .. import cpulist
    try:
        out = list(dict.fromkeys(cpulist.parse(text)))
    except ValueError:
        out = []
    if not out or any(c < 0 for c in out):
        raise UserError(f"--cpus {text!r} is not a CPU list (3,2,1,0 or 0-3).")
    return out


def _weights(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        out = []
    if not out or any(w < 0 for w in out) or sum(out) == 0:
        raise UserError(f"--rss-weights {text!r} is not a list of queue weights "
                        f"(non-negative, not all 0: 1,0,0,0).")
    return out


def _workers(port: int, proto: str):
    from ..groups import find_group
    from ..nic.model import Worker
    g = find_group(port, proto)
    out = []
    for m in g.members:
        try:
            cpus = sorted(os.sched_getaffinity(m.pid))
        except OSError:
            cpus = []
        out.append(Worker(m.slot, m.pid, cpus))
    host = g.addr.rsplit(":", 1)[0].strip("[]")
    return out, host


def _default_ifaces(addr: str | None) -> list[str]:
    from ..kernel.nic import ifaces_for
    return ifaces_for(addr)


def _state_path(iface: str) -> Path:
    return STATE_DIR / f"nic-{iface}.json"


def _netns() -> int:
    from ..kernel.netns import current_inode
    return current_inode()


def _apply(n, v, yes: bool, as_json: bool) -> None:
    from ..kernel import nic as knic
    if not v.changes:
        click.echo(f"reuseport-ctl: nothing to change on {n.name}: its masks already spread it "
                   f"over CPU {','.join(map(str, v.targets))}.")
        return
    if not yes:
        for c in v.changes:
            click.echo(f"  {c.what}\n    {c.command}")
        if not sys.stdin.isatty():
            raise UserError("--apply asks before changing anything and there is no terminal "
                            "to answer: pass --yes.")
        if not click.confirm(f"apply these {len(v.changes)} changes to {n.name}?"):
            raise UserError("nothing changed.")
    path = _state_path(n.name)
    state = _load_state(path) if path.exists() else None
    if state is not None and state.get("netns") != _netns():
        raise UserError(f"{path} was saved for another network namespace's {n.name}: "
                        f"--restore it there first.")
    saved = {c["path"]: c for c in (state or {}).get("changes", [])}
    done = []
    try:
        for c in v.changes:
            old = knic.read_value(c.path)
            knic.write_value(c.path, c.new)
            done.append(c)
            saved.setdefault(c.path, {"path": c.path, "old": old, "what": c.what})
    except OSError as e:
        _save_state(path, n, saved)
        raise UserError(f"the kernel refused {c.command} ({e.strerror}); what was applied "
                        f"before it is saved for --restore.") from None
    _save_state(path, n, saved)
    if as_json:
        click.echo(json.dumps({"interface": n.name, "applied": [c.__dict__ for c in done],
                               "state": str(path)}, indent=2))
    else:
        click.echo(f"reuseport-ctl: applied {len(done)} changes to {n.name}; "
                   f"`reuseport-ctl nic {n.name} --restore` undoes them.")


def _save_state(path: Path, n, saved: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"interface": n.name, "ifindex": n.ifindex, "netns": _netns(),
                               "saved_at": time.time(), "changes": list(saved.values())},
                              indent=2))
    os.replace(tmp, path)


def _load_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): remove it if it is damaged.") from None


def _restore(iface: str, as_json: bool) -> None:
    from ..kernel import nic as knic
    path = _state_path(iface)
    if not path.exists():
        raise UserError(f"nothing to restore on {iface}: no {path} (nic --apply saves it).")
    state = _load_state(path)
    if state.get("netns") != _netns():
        raise UserError(f"{path} was saved in another network namespace: run --restore there.")
    if iface not in knic.netns_links():
        raise UserError(f"no interface {iface!r} in this network namespace to restore.")
    failed = []
    for c in reversed(state.get("changes", [])):
        try:
            knic.write_value(c["path"], c["old"])
        except OSError as e:
            failed.append(f"{c['path']} ({e.strerror})")
    if failed:
        raise UserError(f"could not write back {', '.join(failed)}; {path} is kept.")
    path.unlink()
    if as_json:
        click.echo(json.dumps({"interface": iface, "restored": state.get("changes", [])},
                              indent=2))
    else:
        click.echo(f"reuseport-ctl: restored {len(state.get('changes', []))} values on {iface}.")


COMMANDS = [nic]
