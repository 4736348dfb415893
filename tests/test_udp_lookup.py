"""udp-lookup: the cost of a received datagram with many connected UDP
sockets on one port; the 4-tuple hash presence agrees with BTF."""
from __future__ import annotations

import json
import os

import pytest

from reuseport_ctl.errors import UserError
from reuseport_ctl.experiments import udp_lookup as ux
from reuseport_ctl.experiments.remap import validate
from reuseport_ctl.kernel import btf


def _btf_has_hash4() -> bool:
    try:
        return btf.has_func("udp_lib_hash4") or btf.has_func("udp4_hash4")
    except UserError:
        pytest.skip("no BTF")


def test_small_run(netns):
    fds = len(os.listdir("/proc/self/fd"))
    with open(ux.EARLY_DEMUX) as f:
        demux = f.read()
    out = ux.run_udp_lookup([1, 10, 100], seconds=0.05, rounds=2)
    validate(out, ux.SCHEMA)
    assert out["uhash4"]["present"] == _btf_has_hash4()
    assert [(r["n"], r["path"]) for r in out["rows"]] == [
        (n, p) for n in (1, 10, 100) for p in ("connected", "unconnected")]
    assert all(r["datagrams"] > 0 and r["rate"] > 0 for r in out["rows"])
    assert out["ratio"]["connected"]["n_high"] == 100
    assert len(os.listdir("/proc/self/fd")) == fds          # every socket closed
    with open(ux.EARLY_DEMUX) as f:
        assert f.read() == demux                              # the sysctl restored


def test_the_right_socket_receives(netns):
    srv = ux.Server(0, 5)
    try:
        srv.start()
        client, receiver = srv.endpoints("connected")
        assert receiver is srv.connected[0]
        got, _ = ux._pump(client, receiver, 0.02)
        assert got > 0
        client, receiver = srv.endpoints("unconnected")
        assert receiver is srv.unconnected
        got, _ = ux._pump(client, receiver, 0.02)
        assert got > 0
        for s in srv.connected[1:]:                           # nobody else got any
            with pytest.raises(BlockingIOError):
                s.recv(64)
    finally:
        srv.close()


def test_latency_summary():
    assert ux._latency(None) is None
    lat = ux._latency({6: 10, 7: 30, 10: 1})
    assert lat["p50_bucket_ns"] == 128 and lat["lookups"] == 41


def test_bad_arguments():
    with pytest.raises(UserError):
        ux.run_udp_lookup([0])
    with pytest.raises(UserError):
        ux.run_udp_lookup([1], seconds=0)


def test_cli_json(netns, cli, tmp_path):
    png = tmp_path / "u.png"
    p = cli("udp-lookup", "--n", "1,10,100", "--seconds", "0.05", "--rounds", "1", "--json",
            "--plot", png, check=True)
    out = json.loads(p.stdout)
    validate(out, ux.SCHEMA)
    assert out["uhash4"]["present"] == _btf_has_hash4()
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_table(netns, cli):
    p = cli("udp-lookup", "--n", "1,10", "--seconds", "0.03", "--rounds", "1", check=True)
    assert "4-tuple hash" in p.stdout and "µs/dgram" in p.stdout
