"""Pure logic behind pins, follow and slot numbering (no kernel)."""
from __future__ import annotations

from reuseport_ctl.groups import number_members
from reuseport_ctl.pins import divergence, hint, judge
from reuseport_ctl.policies import parse_policy
from reuseport_ctl.policies.tables import live_table

HERE = (4026532001, 77)


def test_judge_our_namespace():
    assert judge(HERE[0], 77, HERE, None, None) == "here"
    assert judge(HERE[0], 0, HERE, None, None) == "here"          # older record: no cookie
    # same inode, another cookie: our namespace reused a dead one's inode
    assert judge(HERE[0], 55, HERE, None, 0) == "stale"


def test_judge_other_namespaces():
    assert judge(4026532002, 9, HERE, 9, 3) == "live"
    assert judge(4026532002, 9, HERE, 0, None) == "live"          # cookie unknown
    assert judge(4026532002, 9, HERE, 10, 0) == "stale"           # inode reused
    assert judge(4026532002, 9, HERE, None, 0) == "stale"         # nothing names it
    assert judge(4026532002, 9, HERE, None, None) == "stale"      # cBPF record, gone
    assert judge(4026532002, 9, HERE, None, 2) == "orphaned"      # sockets still open


def test_divergence_line():
    assert divergence([], 0, 123) is None
    assert divergence([0], 1, 1000) == ("slot 0's socket is gone; 1 new socket not in the "
                                        "policy: 1,000 connections went by the kernel's hash")
    assert divergence([0, 2], 0, 5, "udp") == \
        "the sockets of slots 0 and 2 are gone: 5 datagrams went by the kernel's hash"
    assert divergence([1], 0, 0) == "slot 1's socket is gone: its share goes by the kernel's hash"
    assert divergence([], 2, 0) == "2 new sockets not in the policy: they get no new connections"
    assert divergence([], 1, None) == "1 new socket not in the policy: it gets no new connections"


def test_number_members_without_and_with_a_table():
    keys = [(30, 7), (10, 9), (20, 8)]
    assert number_members(keys, None) == [(0, 9, True), (1, 8, True), (2, 7, True)]
    # pinned: inode 7 in slot 0, 9 in slot 2 (slot 1's socket closed); 8 is new
    assert number_members(keys, {7: 0, 9: 2, 5: 1}) == [(0, 7, True), (2, 9, True),
                                                         (3, 8, False)]
    assert number_members([(5, 1), (4, 2)], {}) == [(0, 2, False), (1, 1, False)]


def test_live_table_skips_vacant_slots():
    rr = parse_policy("round-robin")
    assert live_table(rr, 3) == [0, 1, 2]
    assert live_table(rr, 3, {1}) == [0, 2]
    assert live_table(rr, 4, set()) == [0, 1, 2, 3]               # grown by one
    assert live_table(parse_policy("drain:0"), 3, {2}) == [1]
    w = live_table(parse_policy("weighted:1,3"), 3)
    assert sorted(w) == [0, 1, 1, 1]                              # slot 2: weight 0
    assert sorted(live_table(parse_policy("weighted:1,3"), 2, {1})) == [0]
    assert live_table(rr, 2, {0, 1}) == []


def test_hints():
    assert hint("detach", 53, "udp") == "reuseport-ctl detach --port 53 --proto udp"
    assert hint("status", 80) == "reuseport-ctl status --port 80"
    assert hint("attach", 80, "tcp", "--policy", "hash", "--follow") == \
        "reuseport-ctl attach --port 80 --policy hash --follow"
