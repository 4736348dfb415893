"""Pure functions behind the eBPF policies: which slots are eligible, in what
order, and the hash mappings the program computes (mirrored here so the
remap experiment and the tests can state the expected choice)."""
from __future__ import annotations

from . import Policy


def smooth_weighted(weights: tuple[int, ...]) -> list[int]:
    """nginx's smooth weighted round-robin: one cycle of sum(weights) picks,
    each slot as often as its weight, spread out rather than in bursts."""
    current = [0] * len(weights)
    total = sum(weights)
    order = []
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: current[i])
        current[best] -= total
        order.append(best)
    return order


def slot_table(policy: Policy, n: int) -> list[int]:
    """The program's `table`: eligible slots, indexed by the policy's choice."""
    if policy.name == "weighted":
        return smooth_weighted(policy.weights)
    if policy.name == "drain":
        return [s for s in range(n) if s not in policy.drain]
    return list(range(n))


def mod_index(h: int, n: int) -> int:
    return h % n


def threshold_index(h: int, n: int) -> int:
    """Hash-threshold (RFC 2992): n equal regions of the 32-bit hash space."""
    return (h * n) >> 32


def jump_index(h: int, n: int) -> int:
    """Integer jump consistent hash, exactly as bpf/select.c computes it."""
    mask = (1 << 64) - 1
    key = ((h << 32) | h) & mask
    b = j = 0
    for _ in range(64):
        b = j
        key = (key * 2862933555777941757 + 1) & mask
        j = ((b + 1) << 31) // ((key >> 33) + 1)
        if j >= n:
            break
    return b


def live_table(policy: Policy, n: int, vacant: set[int] | frozenset = frozenset()) -> list[int]:
    """The table over a group whose membership changed after attach (what
    `attach --follow` writes): n slots, the `vacant` ones (their socket
    closed, no successor yet) left out so the policy stops choosing them
    instead of letting the kernel's hash decide. weighted: a slot beyond
    the weights gets weight 0. Empty when every slot is vacant (the
    program then leaves the choice to the kernel)."""
    if policy.name == "weighted":
        w = tuple(policy.weights[:n]) + (0,) * max(0, n - len(policy.weights))
        base = smooth_weighted(w) if sum(w) else []
    else:
        base = slot_table(policy, n)
    return [s for s in base if s not in vacant]
