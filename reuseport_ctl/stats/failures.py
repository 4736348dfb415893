"""Failed connections and lost datagrams per 10k (pure)."""
from __future__ import annotations

KINDS = ("refused", "reset", "timeout", "other")


def per_10k(n: int, total: int) -> float:
    """n out of total, per 10,000 (0 when there was nothing)."""
    return round(10000 * n / total, 2) if total else 0.0


def failures(totals: dict) -> dict:
    """A load's totals (conns, ok and one count per error kind) as the
    report's numbers: errors by kind, failed, and each per 10k connections
    (or datagrams: for UDP a timeout is a datagram or its echo lost)."""
    conns = totals.get("conns", 0)
    errors = {k: totals.get(k, 0) for k in KINDS}
    failed = sum(errors.values())
    # keep-alive: failures on a connection that had been answered before --
    # the server closed it (idle) as the next request went out; an HTTP
    # client retries such an idempotent request. The rest failed as new
    # connections: the ones a listener's handover decides.
    reused = sum((totals.get("reused") or {}).values())
    return {"conns": conns, "ok": totals.get("ok", 0), "errors": errors, "failed": failed,
            **{f"{k}_per_10k": per_10k(v, conns) for k, v in errors.items()},
            "failed_per_10k": per_10k(failed, conns),
            "failed_reused": reused, "failed_new": failed - reused,
            "failed_new_per_10k": per_10k(failed - reused, conns)}
