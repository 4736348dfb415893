"""`reuseport-ctl verify` on this kernel: the whole suite passes or skips with
a reason, every property the issue lists has its check, the output formats
parse, and a check fails when its property is broken."""
from __future__ import annotations

import json
import re
import time
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from reuseport_ctl.verify import checks as C
from reuseport_ctl.verify import runner
from reuseport_ctl.verify.distribution import spread
from reuseport_ctl.verify.net import IPV4, TCP, UDP, attach_cbpf
from reuseport_ctl.verify import programs as P

# Every property the issue asks for, by check name.
REQUIRED = [
    "tcp-ipv4-distribution", "tcp-ipv6-distribution", "tcp-v4-mapped-distribution",
    "udp-ipv4-distribution", "udp-ipv6-distribution", "udp-v4-mapped-distribution",
    "uid-anti-hijack", "wildcard-specific-separate", "ipv4-ipv6-separate",
    "reuseaddr-listen-conflict", "large-group-listen",
    "cbpf-steering", "ebpf-steering", "steering-replace", "steering-detach",
    "sk-reuseport-sockarray", "sk-reuseport-sockmap", "sk-reuseport-sockhash",
    "sk-lookup-then-reuseport", "cbpf-cpu-steering", "ebpf-numa-steering", "so-incoming-cpu",
    "migrate-children-sysctl", "migrate-requests-sysctl", "migrate-children-bpf",
    "migrate-requests-bpf", "no-migration-resets",
    "udp-connected-4tuple", "udp-hash4-effective",
    "probes-kprobe", "probes-fallback",
]
SELFTESTS = {"net/reuseport_bpf.c", "net/reuseport_bpf_cpu.c", "net/reuseport_bpf_numa.c",
             "net/reuseport_dualstack.c", "net/reuseport_addr_any.c", "net/reuseaddr_conflict.c",
             "net/so_incoming_cpu.c", "net/stress_reuseport_listen.c",
             "bpf/prog_tests/select_reuseport.c", "bpf/prog_tests/migrate_reuseport.c",
             "bpf/prog_tests/sk_lookup.c"}
CLOSING = re.compile(r"^(\d+) passed, (\d+) failed, (\d+) skipped$")


def has(name: str) -> bool:
    from reuseport_ctl.kernel import features
    return next(f for n, fn in features.PROBES if n == name for f in [features.probe(n, fn)]).ok


def test_whole_suite_passes_here(netns, cli, tmp_path):
    xml_path = tmp_path / "verify.xml"
    t0 = time.monotonic()
    p = cli("verify", "--json", "--junit", xml_path, timeout=300)
    took = time.monotonic() - t0
    print(f"\nverify --json took {took:.1f} s")           # the issue wants < 60 s here
    assert p.returncode == 0, p.stdout + p.stderr
    results = json.loads(p.stdout)
    names = [r["name"] for r in results]
    assert set(REQUIRED) <= set(names), set(REQUIRED) - set(names)
    assert len(names) == len(set(names))
    assert {r["selftest"] for r in results if r["selftest"]} == SELFTESTS
    for r in results:
        assert set(r) == {"name", "selftest", "status", "detail", "seconds"}
        assert r["status"] in ("pass", "skip"), r
        assert r["detail"], r
        if r["status"] == "skip":
            assert "lacks" in r["detail"], r
    by = {r["name"]: r for r in results}
    if not has("kprobes"):
        assert by["probes-kprobe"]["status"] == "skip"
        assert "kprobes" in by["probes-kprobe"]["detail"]
    assert by["probes-fallback"]["status"] == "pass"
    # the closing line goes to stderr with --json, last and alone
    last = p.stderr.strip().splitlines()[-1]
    m = CLOSING.match(last)
    assert m, p.stderr
    passed, failed, skipped = map(int, m.groups())
    statuses = [r["status"] for r in results]
    assert (passed, failed, skipped) == (statuses.count("pass"), 0, statuses.count("skip"))
    # JUnit: valid XML with the same counts
    root = ET.parse(xml_path).getroot()
    suite = root.find("testsuite")
    assert int(suite.get("tests")) == len(results)
    assert int(suite.get("failures")) == 0
    assert int(suite.get("skipped")) == skipped
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == names
    assert len([c for c in cases if c.find("skipped") is not None]) == skipped


def test_only_filters(netns, cli):
    p = cli("verify", "--json", "--only", "udp-*", "--only", "isolation", check=True)
    names = [r["name"] for r in json.loads(p.stdout)]
    isolation = {c.name for c in C.all_checks() if c.area == "isolation"}
    assert names and all(n.startswith("udp-") or n in isolation for n in names), names
    assert isolation <= set(names)
    assert "tcp-ipv4-distribution" not in names


def test_only_nothing_matches_is_one_sentence(cli):
    p = cli("verify", "--only", "nosuchcheck")
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "nosuchcheck" in lines[0] and "--list" in lines[0], p.stderr
    assert p.stdout == ""


def test_tap_parses(netns, cli):
    p = cli("verify", "--tap", "--only", "steering", check=True)
    lines = p.stdout.splitlines()
    plan = re.fullmatch(r"1\.\.(\d+)", lines[0])
    assert plan, lines[0]
    tests = [l for l in lines if re.match(r"^(not )?ok \d+ - ", l)]
    assert len(tests) == int(plan.group(1))
    assert [int(re.match(r"^(?:not )?ok (\d+)", l).group(1)) for l in tests] == \
        list(range(1, len(tests) + 1))
    assert not any(l.startswith("not ok") for l in tests)
    assert CLOSING.match(lines[-1]), lines[-1]
    body = lines[1:-1]
    assert all(re.match(r"^((not )?ok \d+ - |# )", l) for l in body), body


# --- the suite can fail -------------------------------------------------------------------

def _return_zero(socks):
    attach_cbpf(socks[0], P.cbpf_sport(4, const=0))     # every flow to member 0


@pytest.mark.parametrize("proto", [TCP, UDP])
def test_distribution_fails_when_property_is_broken(netns, proto):
    # As it is, the property holds...
    assert "64" in spread(proto, IPV4)
    # ...a program sending every flow to member 0 breaks it: the check fails,
    # saying what it saw against what it expected.
    with pytest.raises(C.Fail) as e:
        spread(proto, IPV4, sabotage=_return_zero)
    assert e.value.seen == 1 and "4 of 4" in str(e.value.expected)
    assert "[64, 0, 0, 0]" in str(e.value)
    # A deliberately wrong expectation fails the same way.
    with pytest.raises(C.Fail, match=r"saw 4, expected 5 of 4"):
        spread(proto, IPV4, expect_members=5)


def _broken(ctx):
    """A property that does not hold (for the runner and exit-status tests)."""
    raise C.Fail("members reached", 1, "4 of 4")


def _sleeps(ctx):
    """Never finishes."""
    time.sleep(60)


def test_runner_reports_failure_timeout_and_crash(netns):
    ctx = C.Context(private_netns=True)
    r = runner.run_one(C.Check("broken", _broken, "test", None), ctx)
    assert (r.status, r.detail) == ("fail", "members reached: saw 1, expected 4 of 4")
    t0 = time.monotonic()
    r = runner.run_one(C.Check("sleeps", _sleeps, "test", None), ctx, timeout=1)
    assert r.status == "fail" and "timed out after 1 s" in r.detail
    assert time.monotonic() - t0 < 5
    r = runner.run_one(C.Check("crash", lambda ctx: 1 / 0, "test", None), ctx)
    assert r.status == "fail" and "ZeroDivisionError" in r.detail


def test_failing_check_exits_nonzero(netns, monkeypatch):
    from reuseport_ctl.cli import main
    broken = C.Check("broken-property", _broken, "test", "net/reuseport_bpf.c")
    ok = C.REGISTRY["uid-anti-hijack"]
    monkeypatch.setattr(C, "all_checks", lambda: [ok, broken])
    res = CliRunner().invoke(main, ["verify", "--tap", "--host-netns"])
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    assert lines[0] == "1..2"
    assert "ok 1 - uid-anti-hijack" in lines
    assert "not ok 2 - broken-property" in lines
    assert "# members reached: saw 1, expected 4 of 4" in lines
    assert lines[-1] == "1 passed, 1 failed, 0 skipped"


def test_tap_and_json_together_is_refused(cli):
    p = cli("verify", "--tap", "--json")
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
