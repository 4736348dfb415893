"""A ground-truth server for tests/test_watch_rx.py: N SO_REUSEPORT listeners
on ADDR:PORT in one process; it accepts every connection, records per
listener (by inode) the CPU and NAPI id the kernel says it arrived on
(SO_INCOMING_CPU, SO_INCOMING_NAPI_ID), closes it, and prints the record as
JSON when stdin closes. With "udp": N bound UDP sockets, and the record is
the datagrams each received ({"datagrams": n}: an unconnected socket keeps
no per-datagram CPU).

    python rx_server.py ADDR PORT N [udp]
"""
import json
import os
import selectors
import socket
import sys
import threading

from reuseport_ctl.kernel.sockets import incoming


def main() -> None:
    addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    udp = sys.argv[4:] == ["udp"]
    sel = selectors.DefaultSelector()
    seen: dict[int, dict[str, int]] = {}
    for _ in range(n):
        s = socket.socket(type=socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((addr, port))
        if not udp:
            s.listen(512)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, os.fstat(s.fileno()).st_ino)
        seen[os.fstat(s.fileno()).st_ino] = {}
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    print("ready", flush=True)
    while not done.is_set():
        for key, _ in sel.select(0.05):
            if udp:
                try:
                    key.fileobj.recv(2048)
                except BlockingIOError:
                    continue
                seen[key.data]["datagrams"] = seen[key.data].get("datagrams", 0) + 1
                continue
            try:
                c, _ = key.fileobj.accept()
            except BlockingIOError:
                continue
            napi, cpu = incoming(c)
            k = f"{cpu}/{napi}"
            seen[key.data][k] = seen[key.data].get(k, 0) + 1
            c.close()
    print(json.dumps({str(i): d for i, d in seen.items()}), flush=True)


if __name__ == "__main__":
    main()
