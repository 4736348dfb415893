"""Attach-strategy chains, as data, and the choice among them.

Each probe lists its ways to attach, best first. choose() takes the first
whose facilities all work and says why the better ones were passed over;
the probe code attaches what it is told, and doctor shows the same choice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..kernel import features as F
from ..kernel.features import Facility


@dataclass(frozen=True)
class Step:
    name: str                 # strategy name, e.g. "sk_lookup"
    target: str               # what it attaches to
    needs: tuple[str, ...]    # facility names that must all work
    gives: str                # what the user gets with it


@dataclass(frozen=True)
class Strategy:
    name: str                 # a Step name, or "none"
    reason: str
    target: str = ""


# The raw tracepoint steps' targets (as doctor shows them).
RAW_DATA_READY = "sk_data_ready (raw tracepoint)"
RAW_WAKING = "sched_waking (raw tracepoint)"

CHAINS: dict[str, tuple[Step, ...]] = {
    # Listener lookup: __inet_lookup_listener picks the group and the socket.
    "lookup": (
        Step("kprobe", F.LOOKUP_FUNC, (F.KPROBES, F.BCC),
             "kprobe+kretprobe: every lookup counted, with a latency histogram"),
        Step("sk_lookup", "netns sk_lookup link", (F.SK_LOOKUP, F.BCC),
             "an sk_lookup observer counts every lookup per 4-tuple; no latency"),
        Step("selector", "the group's SK_REUSEPORT program", (F.SK_REUSEPORT, F.BCC),
             "the selector program counts its own decisions; only steered groups"),
    ),
    # Data-ready: sock_def_readable runs when data or a connection is queued.
    # A raw tracepoint calls the program with the struct sock * directly; the
    # tracefs tracepoint (through perf) first builds the whole event record,
    # for every data-ready of every socket on the machine.
    "data_ready": (
        Step("kprobe", "sock_def_readable", (F.KPROBES, F.BCC),
             "kprobe on sock_def_readable counts data-ready events"),
        Step("raw_tracepoint", RAW_DATA_READY,
             (F.RAW_TRACEPOINTS, F.DATA_READY_TRACEPOINT, F.BCC),
             "the sk_data_ready raw tracepoint (inside sock_def_readable, no perf "
             "event record built) counts them"),
        Step("tracepoint", F.DATA_READY_TP, (F.DATA_READY_TRACEPOINT, F.BCC),
             "the sock:sk_data_ready tracepoint (inside sock_def_readable) counts them"),
    ),
    # Wakeups: which worker processes each data-ready event woke.
    "wakeups": (
        Step("raw_tracepoint", RAW_WAKING, (F.RAW_TRACEPOINTS, F.BTF, F.BCC),
             "the sched_waking raw tracepoint (the waker-side twin of sched_wakeup; no "
             "perf event record built), filtered to worker pids, counts process wakeups"),
        Step("tracepoint", F.WAKEUP_TP, (F.TRACEPOINTS, F.BCC),
             "sched:sched_waking (the waker-side twin of sched_wakeup), filtered to worker pids, counts process wakeups"),
    ),
}


def _choose_one(steps: tuple[Step, ...], by_name: dict[str, Facility]) -> Strategy:
    passed = []
    for step in steps:
        missing = [n for n in step.needs if not (n in by_name and by_name[n].ok)]
        if not missing:
            return Strategy(step.name, "; ".join(passed + [step.gives]), step.target)
        passed.append(f"not {step.name}: no {' or '.join(missing)}")
    return Strategy("none", "; ".join(passed) + "; this probe is off", "")


def choose(facilities: Iterable[Facility]) -> dict[str, Strategy]:
    """{probe name: the strategy it will use}, e.g. {"lookup": Strategy("sk_lookup", ...)}."""
    by_name = {f.name: f for f in facilities}
    return {probe: _choose_one(steps, by_name) for probe, steps in CHAINS.items()}
