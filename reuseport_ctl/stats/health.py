"""Member health (pure functions over plain data): which members of a group
drop connections, which queue work but never take it, and which belong to a
process outside the server.

    h = HealthState()
    verdicts = assess(h, observations)       # once per interval

A member is one socket of the group. Each interval the caller passes, per
member, what the kernel showed: the queue (TCP: connections waiting in the
accept queue; UDP: bytes waiting), the cumulative sk_drops, the data-ready
events since the previous interval (arrivals), the serving process's state
letter from /proc (T: stopped, e.g. SIGSTOP) and whether that process
belongs to the server's process tree.

Stuck: a TCP member took nothing in an interval while connections waited
(queue before + arrivals - queue now == 0 with a queue left), a UDP member's
queue did not shrink while datagrams waited; after STUCK_AFTER such intervals
in a row it is named. A stopped process is named at once: the kernel says so.
Drops are a total since the watch began; they warn while they grow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Optional, Sequence

STUCK_AFTER = 2         # intervals in a row with work waiting and none taken


@dataclass(frozen=True)
class MemberSample:
    key: Hashable                       # the member's identity (its socket inode)
    label: str                          # "slot 1 (pid 123)", for the sentences
    proto: str                          # "tcp" | "udp"
    queue_len: int                      # accept queue (TCP) / bytes queued (UDP)
    drops: Optional[int] = None         # sk_drops, cumulative (None: not reported)
    arrivals: Optional[int] = None      # data-ready events since the previous sample
    state: str = ""                     # /proc state letter of the serving process
    outside: Optional[str] = None       # why it is not the server's, or None


@dataclass(frozen=True)
class MemberHealth:
    key: Hashable
    drops: Optional[int]                # since the watch began (None: not reported)
    stuck: bool                         # queues work and takes none
    stopped: bool                       # its process is stopped (SIGSTOP, a debugger)
    outside: Optional[str]              # not in the server's process tree: why
    warning: Optional[str]              # one line for the UI, or None


@dataclass
class _Seen:
    base_drops: Optional[int]
    queue: int
    drops: Optional[int] = None         # at the previous sample
    idle: int = 0                       # intervals in a row with work waiting, none taken


@dataclass
class HealthState:
    seen: dict = field(default_factory=dict)


def took_nothing(s: MemberSample, queue_before: int) -> bool:
    """Work waited during the interval and the member took none of it."""
    if s.queue_len <= 0:
        return False
    if s.proto == "tcp" and s.arrivals is not None:
        return queue_before + s.arrivals - s.queue_len <= 0
    return s.queue_len >= queue_before          # UDP bytes, or no arrival counts


def assess(state: HealthState, samples: Sequence[MemberSample]) -> list[MemberHealth]:
    """Fold one interval's samples into the state; a verdict per member, in
    the samples' order. The first sample of a member is its baseline."""
    out = []
    keys = {s.key for s in samples}
    for k in [k for k in state.seen if k not in keys]:
        del state.seen[k]
    for s in samples:
        seen = state.seen.get(s.key)
        if seen is None:
            seen = state.seen[s.key] = _Seen(base_drops=s.drops, queue=s.queue_len,
                                             drops=s.drops)
        elif took_nothing(s, seen.queue):
            seen.idle += 1
        else:
            seen.idle = 0
        seen.queue = s.queue_len
        if seen.base_drops is None and s.drops is not None:
            seen.base_drops = s.drops
        drops = s.drops - seen.base_drops if s.drops is not None else None
        fresh = (s.drops - seen.drops) if s.drops is not None and seen.drops is not None else 0
        seen.drops = s.drops
        stopped = s.state in ("T", "t")
        stuck = stopped or seen.idle >= STUCK_AFTER
        out.append(MemberHealth(key=s.key, drops=drops, stuck=stuck, stopped=stopped,
                                outside=s.outside,
                                warning=_warning(s, stuck, stopped, drops, fresh)))
    return out


def _warning(s: MemberSample, stuck: bool, stopped: bool, drops: Optional[int],
             fresh: int) -> Optional[str]:
    """The one line for a member, or None. An outsider that is also stuck
    is said to be both (the outsider is the cause); drops alone warn only
    while they grow (fresh: since the previous sample), the total stays in
    the row."""
    what = "connections" if s.proto == "tcp" else "datagrams"
    waiting = (f"{s.queue_len:,} {what} waiting" if s.proto == "tcp"
               else f"{s.queue_len:,} bytes waiting")
    lost = f", {drops:,} dropped" if drops else ""
    parts = []
    if s.outside:
        parts.append(f"is {s.outside}")
    if stopped:
        parts.append(f"is stopped (SIGSTOP or a debugger): the kernel still sends it {what}; "
                     f"{waiting}{lost}")
    elif stuck:
        parts.append(f"takes no {what} while they queue ({waiting}{lost}): "
                     + ("it never accepts" if s.outside else "stuck or overloaded"))
    elif fresh > 0:
        parts.append(f"is dropping {what}: {fresh:,} since the last update ({drops:,} since "
                     f"the watch began); its queue overflows")
    if not parts:
        return None
    if s.outside and len(parts) == 1:
        parts[0] += f": the kernel sends it a share of the group's {what}"
    return f"{s.label} " + ", and ".join(parts) + "."


def session_name(sid: int) -> str:
    """Session 0 is one whose leader is outside this pid namespace (the
    container's or the CI runner's): every process started inside shares it."""
    return "a session begun outside this pid namespace" if sid == 0 else f"session {sid}"


def outsiders(tree_of: dict[int, int], members: Sequence[int],
              prefer: Optional[int] = None, server: Optional[int] = None) -> dict[int, str]:
    """The serving pids that are not part of the server, each with why.

    tree_of: pid -> the session it runs in, absent if gone (never judged); a
    server's master and workers share one (a daemon's setsid, a service's
    under systemd, a shell's job);
    members: the serving pid of each member (repeats allowed). The server is
    the session serving the most members, or that of `prefer` (--pid) when
    given, or `server` itself (a session id: watch --pid resolves its pid's
    session once, so the server stays the server after that pid exits);
    ties go to the lowest session id (the older one, as a rule).
    Anything in another session -- `nginx -t` run from a shell while nginx
    serves, an unrelated server of the same uid -- is an outsider. (Not the
    holders' tree: gunicorn's master holds none of its workers' sockets.)"""
    count: dict[int, int] = {}
    members = [p for p in members if p in tree_of]      # a process gone: nothing to judge
    for p in members:
        count[tree_of[p]] = count.get(tree_of[p], 0) + 1
    if len(count) < 2:
        return {}
    if server is not None and server in count:
        pass
    elif prefer is not None and tree_of.get(prefer, prefer) in count:
        server = tree_of.get(prefer, prefer)
    else:
        server = min(count, key=lambda t: (-count[t], t))
    lead = min(p for p in members if tree_of[p] == server)
    return {p: f"a process outside the server ({session_name(tree_of[p])}; the "
               f"server's is {session_name(server)}, e.g. pid {lead})"
            for p in set(members) if tree_of[p] != server}
