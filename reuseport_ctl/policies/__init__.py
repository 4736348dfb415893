"""Selection policies: how a reuseport group picks the socket for a new
connection or datagram.

    kernel                 no program: the kernel's own 4-tuple hash
    cpu, mod               classic BPF, assembled in Python (no bcc needed)
    hash, threshold, consistent, round-robin, weighted:W1,W2,..,
    least-loaded, drain:K, eBPF (bcc): one SK_REUSEPORT program over a
    queue, numa,           REUSEPORT_SOCKARRAY keyed by worker slot
    least-conns, napi      (least-conns also counts live connections, bpf/conns.h)

parse_policy() turns the user's spelling into a Policy; selector.attach_policy()
loads and attaches it to a group and returns the Selector that owns every BPF
object it created (close() releases them all). migrate.py holds churn's
select-or-migrate program.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError

CBPF = ("cpu", "mod")
EBPF = ("hash", "threshold", "consistent", "round-robin", "weighted", "least-loaded", "drain",
        "queue", "numa", "least-conns", "napi")
NAMES = ("kernel",) + CBPF + EBPF
SPELLING = {"weighted": "weighted:W1,W2,..", "drain": "drain:K"}


def help_text(steering_only: bool = False) -> str:
    """The policy names as a user types them, for --help (steering_only:
    without "kernel", which attach refuses: detach goes back to it)."""
    return ", ".join(SPELLING.get(n, n) for n in NAMES if not (steering_only and n == "kernel"))


@dataclass(frozen=True)
class Policy:
    name: str                                   # one of NAMES
    weights: tuple[int, ...] = ()               # weighted:W1,W2,...
    drain: tuple[int, ...] = field(default=())  # drain:K[,K2...]

    @property
    def kind(self) -> str:
        return "none" if self.name == "kernel" else "cbpf" if self.name in CBPF else "ebpf"

    def __str__(self) -> str:
        if self.weights:
            return f"{self.name}:{','.join(map(str, self.weights))}"
        if self.drain:
            return f"{self.name}:{','.join(map(str, self.drain))}"
        return self.name

    def check_group_size(self, n: int) -> None:
        """Refuse what cannot mean anything for a group of n sockets."""
        if self.weights and len(self.weights) != n:
            raise UserError(f"weighted has {len(self.weights)} weights but the group has "
                            f"{n} sockets: give one weight per socket.")
        bad = [k for k in self.drain if k >= n]
        if bad:
            raise UserError(f"cannot drain worker {bad[0]}: the group has slots 0..{n - 1}.")
        if self.drain and len(set(self.drain)) >= n:
            raise UserError("cannot drain every worker: at least one must take new connections.")
        if self.name == "cpu":
            _check_cpu_policy(n)


def _check_cpu_policy(n: int) -> None:
    """cpu gives slot c the traffic CPU c receives: with more sockets than
    CPUs, the slots past the last CPU would get nothing (run and attach
    refuse it alike)."""
    import os
    ncpu = os.cpu_count() or 1
    if n > ncpu:
        idle = ", ".join(map(str, range(ncpu, n)))
        raise UserError(f"policy cpu gives slot c the traffic CPU c receives, and this "
                        f"machine has {ncpu} CPUs (0-{ncpu - 1}): no CPU would reach "
                        f"worker{'s' if n - ncpu > 1 else ''} {idle} of the {n} in the "
                        f"group; use a group of {ncpu} or fewer (run: --workers {ncpu}).")


def _ascii_int(text: str) -> int:
    """int() also takes "١" (Arabic-Indic one) and "1_0": a slot number or a
    weight is plain ASCII digits."""
    t = text.strip()
    if not (t.isascii() and t.isdigit()):
        raise ValueError(text)
    return int(t)


def parse_policy(spec: str) -> Policy:
    name, _, arg = spec.strip().partition(":")
    name = name.lower()
    if name not in NAMES:
        raise UserError(f"unknown policy {spec!r}: choose one of {', '.join(NAMES)}.")
    if name == "weighted":
        try:
            weights = tuple(_ascii_int(w) for w in arg.split(","))
        except ValueError:
            weights = ()
        if not weights or any(w < 0 for w in weights) or sum(weights) == 0:
            raise UserError(f"malformed weights {arg!r}: write weighted:W1,W2,... with "
                            f"non-negative integers, at least one above zero.")
        if sum(weights) > 1024:
            raise UserError("weights add up to more than 1024: scale them down.")
        return Policy(name, weights=weights)
    if name == "drain":
        try:
            slots = tuple(_ascii_int(k) for k in arg.split(","))
        except ValueError:
            slots = ()
        if not slots or any(k < 0 for k in slots):
            raise UserError(f"malformed drain {arg!r}: write drain:K with K a worker slot (0, 1, ...).")
        return Policy(name, drain=slots)
    if arg:
        raise UserError(f"policy {name!r} takes no argument (got {arg!r}).")
    return Policy(name)
