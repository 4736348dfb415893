"""`watch --json`: one JSON object per interval, one per line (NDJSON).

The same numbers the dashboard shows; counters are totals since the watch
began, rates are over the last interval. The fields are documented in
docs/watch.md ("NDJSON fields"); keep the two in step.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional, TextIO

from ..stats.live import RX_FIELDS, Frame, GroupInfo, rx_by


def _num(x: Optional[float], digits: int = 4):
    """Rounded; None for unknown and for infinity (JSON has no inf)."""
    if x is None or math.isinf(x) or math.isnan(x):
        return None
    return round(x, digits)


def frame_dict(frame: Frame, group: GroupInfo) -> dict:
    return {
        "ts": round(frame.wall, 3),
        "elapsed": round(frame.elapsed, 3),
        "interval": round(frame.interval, 3),
        "port": group.port,
        "proto": group.proto,
        "policy": group.policy,
        "count_of": group.count_of,
        "lookup_strategy": group.lookup_strategy,
        "data_ready_strategy": group.data_ready_strategy,
        "wakeups_strategy": group.wakeups_strategy,
        "listening": frame.listening,
        "reuseport": group.reuseport,
        "dispatcher": frame.dispatcher,
        "group_size": sum(1 for r in frame.rows if not r.child),
        "lookups": frame.lookups,
        "lookups_per_s": _num(frame.lookups_per_s, 1),
        "accepts": frame.accepts,
        "accepts_per_s": _num(frame.accepts_per_s, 1),
        "data_ready": frame.data_ready,
        "data_ready_per_s": _num(frame.data_ready_per_s, 1),
        "wakeups": frame.wakeups,
        "wakeups_per_event": _num(frame.wakeups_per_event, 3),
        "jain": _num(frame.jain),
        "max_min_ratio": _num(frame.max_min_ratio),
        "policy_in_force": None if group.policy == "kernel" or group.own
        else frame.policy_note is None,
        "policy_note": frame.policy_note,
        "policy_owner": group.policy_owner,
        "drops": frame.drops,
        "warnings": list(frame.warnings),
        "rx_note": frame.rx_note,
        "joined": [_ref(r) for r in frame.joined],
        "left": [_ref(r) for r in frame.left],
        "moved": [{"slot": m.slot, "inode": m.inode, "pid": m.pid, "was": m.was}
                  for m in frame.moved],
        "workers": [{
            "pid": r.pid,
            "slot": None if r.child else r.slot,
            "inode": r.inode,
            "tids": list(r.tids),
            "child": r.child,
            "conns": r.conns,
            "live_conns": r.live,
            "cpu_percent": _num(r.cpu_percent, 1),
            "accepts": r.accepts,
            "accepts_per_s": _num(r.accepts_per_s, 1),
            "share": _num(r.share),
            "data_ready": r.data_ready,
            "data_ready_per_s": _num(r.data_ready_per_s, 1),
            "wakeups": r.wakeups,
            "wakeups_per_event": _num(r.wakeups_per_event, 3),
            "spurious_wakeups": r.spurious_wakeups,
            "queue_len": r.queue_len,
            "drops": r.drops,
            "stuck": r.stuck,
            "stopped": r.stopped,
            "outside": r.outside,
            **rx_fields(r.rx, frame.rx_unknown),
        } for r in frame.rows],
    }


def _counts(d: Optional[dict]) -> Optional[dict]:
    return None if d is None else {str(k): n for k, n in d.items()}


def rx_fields(rx, unknown: frozenset) -> dict:
    """Where a member's connections arrived: per CPU, NAPI id and rx queue,
    and the joint paths (the CPU, NAPI id and queue of the same connections);
    null where not known (frame's rx_note says why)."""
    paths = None
    if rx is not None:
        paths = [{**{f: None if f in unknown else v for f, v in zip(RX_FIELDS, key)},
                  "count": n}
                 for key, n in sorted(rx.items(), key=lambda kv: (-kv[1], str(kv[0]))) if n]
    return {"rx_cpus": _counts(rx_by(rx, "cpu", unknown)),
            "napi_ids": _counts(rx_by(rx, "napi_id", unknown)),
            "rx_queues": _counts(rx_by(rx, "rx_queue", unknown)),
            "rx_paths": paths}


def _ref(r) -> dict:
    return {"slot": r.slot, "pid": r.pid, "inode": r.inode}


class NdjsonWriter:
    """Writes one line per frame and flushes it (a pipe to jq sees it at once)."""

    def __init__(self, out: TextIO, group: GroupInfo):
        self.out, self.group = out, group

    def write(self, frame: Frame) -> None:
        try:
            self.out.write(json.dumps(frame_dict(frame, self.group), separators=(",", ":")) + "\n")
            self.out.flush()
        except BrokenPipeError:     # `watch --json | head -1`: the reader is done
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.out.fileno())     # no second error at exit
            os.close(devnull)
            raise SystemExit(0) from None
