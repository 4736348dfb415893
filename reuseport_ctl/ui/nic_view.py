"""nic's report: one plain dict (what --json prints) and its rich rendering."""
from __future__ import annotations

from dataclasses import asdict

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..nic.model import to_dict
from ..nic.verdict import cpulist


def nic_report(nics, verdicts, topo, workers=None, port=None) -> dict:
    """The JSON shape; render_nic draws exactly these values."""
    out = {"topology": to_dict(topo), "port": port,
           "workers": [asdict(w) for w in workers] if workers else None,
           "interfaces": []}
    for nic, v in zip(nics, verdicts):
        vd = asdict(v)
        vd["commands"] = v.commands()
        out["interfaces"].append({**to_dict(nic), "verdict": vd})
    return out


def _cpus(cpus) -> str:
    return "-" if cpus is None else cpulist(cpus)


def _opt(v) -> str:
    return "-" if v is None else str(v)


def render_nic(d: dict) -> Group:
    parts = []
    topo = d["topology"]
    nodes = ", ".join(f"node {n}: CPU {cpulist(c)}" for n, c in topo["nodes"].items())
    parts.append(Text(f"CPUs {cpulist(topo['cpus'])}; NUMA {nodes}", style="bold"))
    if d.get("workers"):
        parts.append(Text(f"workers on port {d['port']}: " + ", ".join(
            f"{w['slot']}→CPU {cpulist(w['cpus'])}" for w in d["workers"])))
    for i in d["interfaces"]:
        parts.append(Text(""))
        ch = i["channels"]
        chan = ("channels: " + ", ".join(f"{k} {ch[k]}/{ch[k + '_max']}"
                                         for k in ("rx", "tx", "other", "combined")
                                         if ch[k] or ch[k + "_max"])) if ch else \
            "channels: not exposed"
        speed = f"{i['speed_mbps']} Mb/s" if i["speed_mbps"] else "speed unknown"
        parts.append(Text(f"{i['name']} (ifindex {i['ifindex']}, {i['kind']}, driver "
                          f"{i['driver'] or '?'}{', ' + i['bus_info'] if i['bus_info'] else ''}, "
                          f"{speed}, {i['operstate']})", style="bold cyan"))
        parts.append(Text(f"  queues: rx {i['real_rx_queues']}/{i['num_rx_queues']}, tx "
                          f"{i['real_tx_queues']}/{i['num_tx_queues']} (in use/allocated); {chan}"))
        rss = i["rss"]
        if rss["indirection"]:
            used = sorted(set(rss["indirection"]))
            parts.append(Text(f"  RSS: {rss['hfunc'] or '?'} hash, {len(rss['indirection'])}-entry "
                              f"table over queues {cpulist(used)}; key "
                              f"{(rss['key'] or '-')[:24]}{'…' if rss['key'] else ''}"))
        else:
            parts.append(Text(f"  RSS: {rss['missing']}"
                              + (f" (hash function {rss['hfunc']})" if rss["hfunc"] else ""),
                              style="yellow"))
        for flow, fields in rss["fields"].items():
            parts.append(Text(f"    {flow} hashes: {', '.join(fields) or 'nothing'}"))

        v = i["verdict"]
        t = Table(title_justify="left", title=f"{i['name']} receive queues")
        for col in ("rx queue", "IRQ", "IRQ fires on", "RPS CPUs", "received on", "workers",
                    "packets"):
            t.add_column(col, no_wrap=True)
        packets = {q["index"]: q["packets"] for q in i["rx"]}
        for q in v["queues"]:
            irq = next((x for x in i["irqs"] if x["number"] == q["irq"]), None)
            t.add_row(str(q["queue"]), f"{q['irq']} {irq['name']}" if irq else "-",
                      _cpus(q["irq_cpus"]), _cpus(q["rps"]) if q["rps"] else "off",
                      _cpus(q["receives_on"]) if q["receives_on"] is not None else "sender's CPU",
                      ",".join(map(str, q["worker_slots"])) or "-", _opt(packets.get(q["queue"])))
        parts.append(t)
        if i["tx"]:
            tt = Table(title_justify="left", title=f"{i['name']} transmit queues")
            for col in ("tx queue", "IRQ", "XPS CPUs", "packets"):
                tt.add_column(col, no_wrap=True)
            for q in i["tx"]:
                tt.add_row(str(q["index"]), _opt(q["irq"]),
                           "not exposed" if q["xps_cpus"] is None else _cpus(q["xps_cpus"]) or
                           "off", _opt(q["packets"]))
            parts.append(tt)
        other = [x for x in i["irqs"] if x["role"] == "other"]
        for x in other:
            parts.append(Text(f"  other IRQ {x['number']} {x['name']}: CPU {cpulist(x['affinity'])}"))
        for n in i["notes"]:
            parts.append(Text(f"  note: {n}", style="dim"))

        parts.append(Text("verdict", style="bold green" if v["aligned"] else "bold yellow"))
        for f in v["findings"]:
            parts.append(Text(f"  • {f}"))
        if v["changes"]:
            parts.append(Text(f"  to spread {i['name']} over CPU {cpulist(v['targets'])} "
                              f"(nic {i['name']} --apply does this, --restore undoes it):"))
            for c, cmd in zip(v["changes"], v["commands"]):
                parts.append(Text(f"    {c['what']}"))
                parts.append(Text(f"      {cmd}", style="bold"))
        else:
            parts.append(Text("  no mask to change."))
        if v["run_command"]:
            parts.append(Text("  workers that line up: ") + Text(v["run_command"], style="bold"))
    return Group(*parts)
