"""The least HTTP/1.1 a worker needs so curl, wrk and any client work: find
where a request ends, decide keep-alive, and answer 200 naming the worker."""
from __future__ import annotations

from typing import Optional

MAX_HEAD = 16 * 1024


class BadRequest(ValueError):
    pass


def next_request(buf: bytes | bytearray) -> Optional[tuple[int, bool]]:
    """(bytes the first complete request takes, keep the connection alive?),
    or None while the request is incomplete."""
    end, sep = buf.find(b"\r\n\r\n"), 4
    if end < 0:
        end, sep = buf.find(b"\n\n"), 2          # tolerate bare-LF clients (nc)
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise BadRequest("request head too large")
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("not an HTTP/1.x request line")
    length, connection = 0, ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            if not value.isdigit():
                raise BadRequest("bad Content-Length")
            length = int(value)
        elif name == "connection":
            connection = value
        elif name == "transfer-encoding":
            raise BadRequest("chunked request bodies are not supported")
    total = end + sep + length
    if len(buf) < total:
        return None
    if parts[2] == "HTTP/1.0":
        keep = "keep-alive" in connection
    else:
        keep = "close" not in connection
    return total, keep


def responses(slot: int, pid: int) -> tuple[bytes, bytes, bytes]:
    """The worker's three fixed answers: 200 keep-alive, 200 close, 400."""
    body = f"worker {slot} pid {pid}\n".encode()

    def head(status: str, conn: str, body: bytes) -> bytes:
        return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nX-Worker: {slot}\r\nX-Worker-Pid: {pid}\r\n"
                f"Connection: {conn}\r\n\r\n").encode() + body
    return head("200 OK", "keep-alive", body), head("200 OK", "close", body), \
        head("400 Bad Request", "close", b"bad request\n")


def udp_reply(slot: int, payload: bytes) -> bytes:
    return b"worker: %d\n" % slot + payload
