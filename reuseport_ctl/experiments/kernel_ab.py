"""Kernel A/B (`reuseport-ctl compare-kernels A B`): the same `verify`,
`doctor` and a small distribution fingerprint on two kernels, side by side,
with what differs picked out.

The runs are kernel_matrix's (the running kernel here, any other in one VM
boot each, one after the other); the guest also runs `remap` (moved fraction
per join/leave) and a short `run --load` (connections per worker). This
module only compares two such runs; compare() is pure, so it is unit-tested
over recorded verify/doctor/remap JSON (tests/test_kernel_ab.py).

What counts as a difference:
- a check whose status differs (pass on one, fail or skip on the other, or
  absent from one);
- a probe strategy or a facility that differs in `doctor`;
- a moved fraction that differs by more than its noise: each flow moves or
  not as its hash falls (the hash has a per-boot secret), so a measured
  fraction is binomial around the policy's theoretical one, standard error
  sqrt(p(1-p)/flows); two kernels differ when |A - B| exceeds
  NOISE_SIGMAS combined standard errors (and at least one flow);
- a spread of connections over members whose verdict differs: a chi-square
  test against an even split says whether the counts look like a hash
  (hash-like), are far more even than a hash gives (even: a counter, not a
  hash), or are skewed beyond chance (uneven).
"""
from __future__ import annotations

import math
import re

from . import kernel_matrix as KM

NOISE_SIGMAS = 3.0
UNEVEN_P = 0.001        # chi-square p below: skewed beyond chance
EVEN_P = 0.999          # chi-square p above: more even than a random hash
# verify's distribution checks say "64 tcp ipv4 flows over 4 members: [14, 17, 10, 23]"
_COUNTS = re.compile(r"(\d+) (.+?) flows over \d+ members: \[([\d, ]+)\]")


def run_ab(a: str, b: str, **kw) -> dict:
    """Run both kernels (kernel_matrix.run_matrix) and add the comparison."""
    record = KM.run_matrix([a, b], distribution=True, who="compare-kernels", **kw)
    record["ab"] = compare(*record["kernels"])
    return record


# --- verify and doctor -------------------------------------------------------------------

def change(a: dict | None, b: dict | None) -> str | None:
    """How a check's result changed from A to B: None (the same), 'regressed'
    (fails on B only), 'fixed' (fails on A only), 'skip' (runs on one, skips
    on the other) or 'missing' (absent from one)."""
    sa, sb = (c and c["status"] for c in (a, b))
    if sa == sb:
        return None
    if sa is None or sb is None:
        return "missing"
    if sb == "fail":
        return "regressed"
    if sa == "fail":
        return "fixed"
    return "skip"


def check_rows(a: dict, b: dict) -> list[dict]:
    """kernel_matrix.merge's rows for the two kernels, each with its change."""
    rows = KM.merge([a, b])
    for r in rows:
        r["change"] = change(r["cells"][a["label"]], r["cells"][b["label"]])
        r["differs"] = r["change"] is not None
    return rows


def doctor_rows(a: dict, b: dict) -> tuple[list[dict], list[dict]]:
    """doctor's probe and facility rows, each marked differs (a strategy, or
    whether a facility works)."""
    la, lb = a["label"], b["label"]
    probes = KM.probe_rows([a, b])
    for r in probes:
        ca, cb = r["cells"][la], r["cells"][lb]
        r["differs"] = (ca or {}).get("strategy") != (cb or {}).get("strategy")
    facs = KM.facility_rows([a, b])
    for r in facs:
        ca, cb = r["cells"][la], r["cells"][lb]
        r["differs"] = (ca or {}).get("ok") != (cb or {}).get("ok")
    return probes, facs


# --- remap: moved fraction ---------------------------------------------------------------

def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else math.inf


def remap_rows(a: list[dict] | None, b: list[dict] | None) -> list[dict]:
    """One row per (policy, change, n_before → n_after) measured on both."""
    def key(r):
        return (r["policy"], r.get("change"), r["n_before"], r["n_after"])
    bs = {key(r): r for r in b or []}
    rows = []
    for ra in a or []:
        rb = bs.get(key(ra))
        if rb is None:
            continue
        p = ra["theoretical_fraction"]
        na, nb = ra["flows"], rb["flows"]
        fa, fb = ra["moved_fraction"], rb["moved_fraction"]
        se_a, se_b = _se(p, na), _se(p, nb)
        # never finer than one flow: a fraction of 0 or 1 has no binomial noise
        noise = max(NOISE_SIGMAS * math.hypot(se_a, se_b), 1 / min(na, nb))
        rows.append({
            "policy": ra["policy"], "change": ra.get("change"),
            "n_before": ra["n_before"], "n_after": ra["n_after"], "theory": p,
            "a": fa, "b": fb, "flows_a": na, "flows_b": nb,
            "delta": round(fb - fa, 6), "noise": round(noise, 6),
            "differs": abs(fb - fa) > noise,
            "a_off_theory": abs(fa - p) > max(NOISE_SIGMAS * se_a, 1 / na),
            "b_off_theory": abs(fb - p) > max(NOISE_SIGMAS * se_b, 1 / nb)})
    return rows


# --- spread of connections over members ----------------------------------------------------

def chi2_sf(x: float, k: int) -> float:
    """P(X >= x) for a chi-square variable with k degrees of freedom (closed
    forms for integer k: no scipy needed)."""
    if x <= 0:
        return 1.0
    h = x / 2
    if k % 2 == 0:
        term = total = 1.0
        for i in range(1, k // 2):
            term *= h / i
            total += term
        return min(1.0, math.exp(-h) * total)
    total = math.erfc(math.sqrt(h))
    term = math.sqrt(2 * x / math.pi) * math.exp(-h)
    for j in range(1, (k + 1) // 2):
        total += term
        term *= x / (2 * j + 1)
    return min(1.0, total)


def spread(counts: list[int]) -> dict:
    """Counts per member against an even split: Jain, max:min, chi-square p
    and the verdict (even / hash-like / uneven)."""
    n, total = len(counts), sum(counts)
    if n < 2 or total == 0:
        return {"counts": counts, "total": total, "jain": None, "max_min": None,
                "chi2": None, "p": None, "verdict": "none"}
    mean = total / n
    chi2 = sum((c - mean) ** 2 for c in counts) / mean
    p = chi2_sf(chi2, n - 1)
    verdict = "uneven" if p < UNEVEN_P else "even" if p > EVEN_P else "hash-like"
    return {"counts": counts, "total": total,
            "jain": round(total * total / (n * sum(c * c for c in counts)), 4),
            "max_min": round(max(counts) / min(counts), 3) if min(counts) else None,
            "chi2": round(chi2, 3), "p": round(p, 4), "verdict": verdict}


def member_counts(run: dict) -> dict[str, list[int]]:
    """Every per-member count a run has: verify's distribution checks (their
    detail lists the counts) and the short `run --load` (per worker)."""
    out = {}
    for c in run.get("verify") or []:
        m = _COUNTS.search(c.get("detail") or "")
        if c["name"].endswith("-distribution") and m:
            out[c["name"]] = [int(x) for x in m.group(3).split(",")]
    sp = run.get("spread")
    if sp and sp.get("workers"):
        what = f"run --load: {sp.get('proto', 'tcp')}, {len(sp['workers'])} workers"
        out[what] = [w["count"] for w in sp["workers"]]
    return out


def spread_rows(a: dict, b: dict) -> list[dict]:
    ca, cb = member_counts(a), member_counts(b)
    rows = []
    for name in ca:
        if name in cb:
            sa, sb = spread(ca[name]), spread(cb[name])
            rows.append({"name": name, "a": sa, "b": sb,
                         "differs": sa["verdict"] != sb["verdict"]})
    return rows


# --- the whole comparison ----------------------------------------------------------------

def compare(a: dict, b: dict) -> dict:
    """Two kernel_matrix runs (labelled) → every row, each marked differs, and
    the counts of differences."""
    checks = check_rows(a, b)
    probes, facs = doctor_rows(a, b)
    remap = remap_rows(a.get("remap"), b.get("remap"))
    spreads = spread_rows(a, b)
    ran = bool(a.get("verify")) and bool(b.get("verify"))
    # a distribution step that gave no JSON on a kernel that ran: say why, not just "none"
    missing = {f"{r['label']}: {step}": (r.get(f"{key}_run") or {}).get("error") or "no output"
               for r in (a, b) if r.get("verify")
               for step, key in (("remap", "remap"), ("run --load", "spread"))
               if r.get(key) is None}
    return {
        "a": a["label"], "b": b["label"], "ran": ran, "distribution_missing": missing,
        "checks": checks, "probes": probes, "facilities": facs,
        "remap": remap, "spread": spreads,
        "summary": {
            "checks": len(checks),
            "checks_differ": sum(r["differs"] for r in checks) if ran else None,
            "regressed": sum(r["change"] == "regressed" for r in checks),
            "fixed": sum(r["change"] == "fixed" for r in checks),
            "probes_differ": sum(r["differs"] for r in probes),
            "facilities_differ": sum(r["differs"] for r in facs),
            "remap_differ": sum(r["differs"] for r in remap),
            "remap_compared": len(remap),
            "spread_differ": sum(r["differs"] for r in spreads),
            "spread_compared": len(spreads)}}


def exit_status(record: dict) -> int:
    """1 when a kernel could not be run or a check fails on B but not on A
    (so `git bisect run` can use it); 0 otherwise."""
    if any(not r.get("ok") for r in record["kernels"]):
        return 1
    return 1 if record["ab"]["summary"]["regressed"] else 0
