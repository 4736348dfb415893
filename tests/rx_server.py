"""A ground-truth server for tests/test_watch_rx.py: N SO_REUSEPORT listeners
on ADDR:PORT in one process; it accepts every connection, records per
listener (by inode) the CPU and NAPI id the kernel says it arrived on
(SO_INCOMING_CPU, SO_INCOMING_NAPI_ID), closes it, and prints the record as
JSON when stdin closes.

    python rx_server.py ADDR PORT N
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
    sel = selectors.DefaultSelector()
    seen: dict[int, dict[str, int]] = {}
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((addr, port))
        s.listen(512)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, os.fstat(s.fileno()).st_ino)
        seen[os.fstat(s.fileno()).st_ino] = {}
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    print("ready", flush=True)
    while not done.is_set():
        for key, _ in sel.select(0.05):
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
